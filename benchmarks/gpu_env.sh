# Sourced by the GPU benchmark scripts (run from the repo root on the GPU machine): installs the wheels carried in
# .whl/ (bitsandbytes, pydantic + its deps, deepspeed, hjson, liger-kernel; see ../shared/device/wheels.sh) into
# /tmp/site, puts src/ (and the repo root, for `python3 -m benchmarks...`) on PYTHONPATH, and sets the environment
# every run shares. NVLink multicast stays off (device/KINDS.md: a program using it can take a shared host's GPUs
# out of service), also for the processes torchrun and DeepSpeed start, which inherit this environment.
if compgen -G ".whl/*.whl" >/dev/null && command -v nvidia-smi >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD
else
  export PYTHONPATH=$PWD/src:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

gpu_versions() {  # gpu_versions FILE: package versions, GPUs, cores and host memory, printed and written to FILE
  {
    python3 -c "
import importlib, torch
names = ('transformers', 'peft', 'accelerate', 'deepspeed', 'bitsandbytes', 'liger_kernel')
def version(n):
    try:
        return importlib.import_module(n).__version__
    except Exception:
        return 'absent'
print('torch', torch.__version__, *(f'{n} {version(n)}' for n in names))
print('gpus', torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')
" 2>&1 | grep -v -i warn
    nproc | sed 's/^/cpu cores /'
    grep MemTotal /proc/meminfo
  } | tee "$1"
}
