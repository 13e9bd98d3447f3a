# Loaded as sitecustomize by vLLM instances run with MooncakeConnector on a CPU-only
# machine (scripts/vllm-env.sh copies it; scripts/vllm-serve.sh --connector mooncake puts
# it on PYTHONPATH). vLLM 0.32's MooncakeConnectorWorker calls
# torch.accelerator.current_device_index(), which PyPI's torch (a CUDA build) answers
# with "Found no NVIDIA driver" when there is no GPU. With no CUDA device, it answers 0,
# which vLLM's CPU platform then passes to torch.cpu.set_device, as for any CPU worker.
import torch

if not torch.cuda.is_available():
    torch.accelerator.current_device_index = lambda: 0
