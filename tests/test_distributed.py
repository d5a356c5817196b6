"""DDP: two processes with the gloo backend on the CPU train a tiny CapsNet for a few steps;
the replicas stay identical and match one process trained with the same global batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from capsnet_ext.training import load_checkpoint, load_config, train

STEPS = 4
GLOBAL_BATCH = 16


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bundle():
    from capsnet_ext.data import build_datasets

    return build_datasets("mnist", download=False, train_limit=96, test_limit=32)


def _config(out):
    # max_shift=2: the augmentation is part of what must match across world sizes.
    return load_config(preset="mnist", out=str(out), batch_size=GLOBAL_BATCH, max_steps=STEPS,
                       log_every=2, eval_every=STEPS, eval_limit=32, progress=False,
                       tensorboard=False, device="cpu", seed=3, max_shift=2,
                       model=dict(conv_channels=8, primary_channels=4, decoder_hidden=[32, 64]))


class _Recorder:
    """Gradients after every backward pass (DDP has averaged them by then) and the
    parameters at the final evaluation (after the last optimizer step)."""

    def __init__(self):
        self.grads, self.model, self.final = [], None, None

    def on_after_backward(self, step, model):
        self.model = model
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    def on_eval(self, step, metrics):
        if step == STEPS:
            self.final = {n: p.detach().clone() for n, p in self.model.named_parameters()}


def _worker(rank, world_size, port, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        recorder = _Recorder()
        result = train(_config(out), callbacks=[recorder], datasets=_bundle())
        torch.save({"params": recorder.final, "grads": recorder.grads, "result": result},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    try:
        _bundle()
    except FileNotFoundError as exc:
        pytest.skip(f"real MNIST files not found: {exc}")
    single_recorder = _Recorder()
    single = train(_config(tmp_path / "single"), callbacks=[single_recorder], datasets=_bundle())
    single_params = load_checkpoint(single["last_checkpoint"])["model"]

    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(results)), nprocs=2, join=True)
    ranks = [torch.load(results / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # Replicas are identical: same parameters on both ranks after every step.
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    # DDP averaged gradients equal the single process's full-batch gradients.
    assert len(ranks[0]["grads"]) == len(single_recorder.grads) == STEPS
    for step in range(STEPS):
        for name, grad in single_recorder.grads[step].items():
            torch.testing.assert_close(ranks[0]["grads"][step][name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"step {step} {name}: {m}")
    # And the trained weights (rank 0's checkpoint) match the single-process run.
    ddp_params = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")["model"]
    for name, value in single_params.items():
        assert torch.equal(ddp_params[name], ranks[0]["params"][name]), name
        torch.testing.assert_close(ddp_params[name], value, rtol=1e-4, atol=1e-5)
    assert ranks[0]["result"]["world_size"] == 2 and ranks[0]["result"]["step"] == STEPS
    assert ranks[0]["result"]["test_error"] == pytest.approx(single["test_error"], abs=1 / 32 + 1e-9)
    assert len((tmp_path / "ddp" / "train_log.csv").read_text().splitlines()) == 1 + STEPS // 2
