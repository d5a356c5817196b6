"""Evaluation metrics, ensembles, ``capsnet-ext train``/``eval`` command lines and figures."""
import json

import pytest
import torch
from torch import nn

from capsnet_ext import reference
from capsnet_ext.nn import CapsNet
from capsnet_ext.training import cli as train_cli
from capsnet_ext.training import eval_cli, figures
from capsnet_ext.training.evaluation import correct_mask, ensemble_metrics, evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--set", "model.conv_channels=8", "--set", "model.primary_channels=4",
        "--set", "model.decoder_hidden=[32,64]"]


def assert_png(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, path


class _Lookup(nn.Module):
    """A classifier whose logits are read from the image: pixel (0, 0) holds the class."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].round().long(), 3).float()


class _Items(torch.utils.data.Dataset):
    def __init__(self, predicted, labels):
        self.predicted, self.labels = predicted, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = torch.zeros(1, 4, 4)
        image[0, 0, 0] = self.predicted[i]
        return {"image": image, "label": torch.tensor(self.labels[i])}


def test_evaluate_counts_errors_per_class_and_confusion():
    predicted = [0, 1, 2, 2, 1, 0, 0]
    labels = [0, 1, 2, 1, 1, 2, 0]
    metrics = evaluate(_Lookup(), _Items(predicted, labels), num_classes=3, batch_size=3)
    assert metrics["n"] == 7 and metrics["error"] == pytest.approx(2 / 7)
    assert metrics["confusion"] == [[2, 0, 0], [0, 2, 1], [1, 0, 1]]
    assert metrics["per_class_accuracy"] == pytest.approx([1.0, 2 / 3, 0.5])
    assert evaluate(_Lookup(), _Items(predicted, labels), num_classes=3, limit=3)["n"] == 3


def test_multimnist_counts_an_example_right_only_with_both_labels():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0],    # predicts {0, 1}
                           [0.9, 0.1, 0.8, 0.0],    # predicts {0, 2}
                           [0.1, 0.2, 0.9, 0.95]])  # predicts {2, 3}
    batch = {"labels": torch.tensor([[1, 0], [0, 1], [3, 2]])}
    assert correct_mask(scores, batch, multi_label=True).tolist() == [True, False, True]
    members = [scores, torch.tensor([[0.0, 0.9, 0.0, 0.9]] * 3)]
    # Averaged: row 0 -> {1, 0 or 3}: 0.45+0.0 vs ... compute exactly below.
    mean = torch.stack(members).mean(0)
    expected = correct_mask(mean, batch, True).double().mean().item()
    result = ensemble_metrics(members, batch["labels"], multi_label=True)
    assert result["accuracy"] == pytest.approx(expected) and result["members"] == 2
    single = ensemble_metrics([torch.tensor([[0.2, 0.8], [0.6, 0.4]])], torch.tensor([1, 1]), False)
    assert single["error"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same shape"):
        ensemble_metrics([torch.zeros(2, 3), torch.zeros(3, 3)], torch.zeros(2).long(), False)


def _tiny_capsnet(size=28):
    torch.manual_seed(0)
    return CapsNet(input_size=size, conv_channels=8, primary_channels=4, decoder_hidden=(32, 64)).eval()


def test_perturbation_grid_decodes_each_dimension_sweep(tmp_path):
    model = _tiny_capsnet()
    image = torch.rand(1, 28, 28)
    grid, cls = figures.perturbation_images(model, image)
    assert grid.shape == (16, 11, 1, 28, 28)
    assert figures.PERTURBATIONS.tolist() == pytest.approx([-0.25 + 0.05 * k for k in range(11)])
    with torch.no_grad():
        out = model(image[None])
        mask = torch.nn.functional.one_hot(out.lengths.argmax(1), 10).float()
        plain = model.reconstruct(out.capsules, mask).view(1, 28, 28)
    for d in range(16):  # the zero perturbation (column 5) is the unperturbed reconstruction
        torch.testing.assert_close(grid[d, 5], plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(grid[3, 0], grid[3, 10])
    assert_png(figures.plot_perturbation_grid(model, image, tmp_path / "grid.png"))


def test_routing_logit_changes_follow_the_reference_routing(tmp_path):
    model = _tiny_capsnet()
    images = torch.rand(3, 1, 28, 28)
    changes = figures.routing_logit_changes(model, images, iterations=4)
    assert len(changes) == 4 and all(c > 0 for c in changes)
    # The final capsules after 4 iterations equal the reference routing's.
    with torch.no_grad():
        u = model.primary_capsules(images)
        v = reference.capsule_routing(u, model.digits.weight, 4, bias=model.digits.bias)
        u_hat = reference.predict(u, model.digits.weight)
        logits = torch.zeros(u_hat.shape[:3])
        for _ in range(3):
            c = reference.coupling(logits)
            logits = logits + torch.einsum("bijd,bjd->bij", u_hat, reference.squash(
                torch.einsum("bij,bijd->bjd", c, u_hat) + model.digits.bias))
        c = reference.coupling(logits)
        v_manual = reference.squash(torch.einsum("bij,bijd->bjd", c, u_hat) + model.digits.bias)
    torch.testing.assert_close(v, v_manual)
    assert_png(figures.plot_routing_dynamics({"a": changes, "b": changes[::-1]}, tmp_path / "r.png"))
    with pytest.raises(ValueError, match="iterations"):
        figures.routing_logit_changes(model, images, iterations=0)


def test_multimnist_and_reconstruction_figures(tmp_path):
    model = _tiny_capsnet(36)
    batch = {"image": torch.rand(4, 1, 36, 36), "labels": torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])}
    assert_png(figures.plot_multimnist(model, batch, tmp_path / "mm.png"))
    assert_png(figures.plot_reconstructions(model, batch["image"], tmp_path / "rec.png"))
    assert_png(figures.plot_confusion([[3, 1], [0, 4]], tmp_path / "conf.png"))
    no_decoder = CapsNet(input_size=28, conv_channels=8, primary_channels=4, decoder=False)
    with pytest.raises(ValueError, match="no reconstruction decoder"):
        figures.plot_reconstructions(no_decoder, torch.rand(2, 1, 28, 28), tmp_path / "x.png")


def test_train_then_eval_command_lines_write_metrics_and_figures(tmp_path, capsys):
    pytest.importorskip("capsnet_ext.data")
    run = tmp_path / "run"
    args = ["--preset", "mnist", "--out", str(run), "--max-steps", "6", "--batch-size", "16",
            "--train-limit", "128", "--test-limit", "48", "--log-every", "2", "--checkpoint-every", "3",
            "--no-progress", "--no-tensorboard", "--device", "cpu", "--json"] + TINY
    code = train_cli.main(args)
    if code == 2 and "could not find" in capsys.readouterr().err:
        pytest.skip("real MNIST files not found")
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 6 and summary["backend"] == "reference"
    # Resume from the run folder with a longer budget.
    assert train_cli.main(["--resume", str(run), "--max-steps", "8", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 8

    out = tmp_path / "eval"
    assert eval_cli.main([str(run), str(run / "checkpoints" / "best.pt"), "--test-limit", "48",
                          "--figures", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "eval.json").read_text())
    first = report["models"][0]
    assert first["n"] == 48 and len(first["per_class_accuracy"]) == 10
    assert sum(map(sum, first["confusion"])) == 48
    assert report["ensemble"]["members"] == 2
    for name in ("confusion", "reconstructions", "perturbation_grid", "routing_logit_changes",
                 "training_curves"):
        assert_png(out / "model0" / f"{name}.png")
    printed = capsys.readouterr()
    # The figures written are listed, one line per model.
    assert f"figures in {out / 'model0'}: confusion.png" in printed.out
    assert "routing_logit_changes.png" in printed.out
    assert len(first["routing_logit_changes"]) == 10

    assert train_cli.main(["--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert eval_cli.main([str(tmp_path / "missing.pt")]) == 2
