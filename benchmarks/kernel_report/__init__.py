"""Static kernel report: launches, compiled-kernel facts and a lower-bound time for each kernel
backend, without a GPU. Run ``python -m benchmarks.kernel_report --help``.

* :mod:`.triton_launches` records the Triton backend's launches under a simulated GPU;
* :mod:`.triton_profile` counts statement executions of sampled programs in Triton's interpreter;
* :mod:`.cuda_backend` records the csrc/ launch plan through the CPU emulation driver
  (:file:`cuda_recorder.h`) and compiles csrc/ with nvcc;
* :mod:`.sass` reads cubins (cuobjdump, nvdisasm); :mod:`.model` is the occupancy and
  lower-bound model; :mod:`.gpus` the spec-sheet figures; :mod:`.report` the output.
"""
