"""Issue 8, for a lent GPU: the VAE decode of the candidates is the largest share of an eager SD1.5 prompt (0.88 of
2.05 s on an H200, 182 TFLOP/s). Time SD1.5's VAE (random weights, fp16) per 512-px image over memory layout, chunk
size (Pipeline.decode's `chunk`), cuDNN's algorithm search and torch.compile, to pick what to change. Run by
`.ci/gpu-check vae`; on a machine without CUDA it runs the same steps on a few 64-px images, as a smoke test of this
script."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffusers import AutoencoderKL  # noqa: E402

import diffusion as D  # noqa: E402

cuda = torch.cuda.is_available()
device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)  # fp16: spo.py's default on CUDA
side, images, chunks = (64, 64, (8, 16)) if cuda else (8, 4, (2,))  # latent side: 64 is a 512-px image
sync = torch.cuda.synchronize if cuda else lambda: None
with torch.device(device):
    vae = AutoencoderKL(**D.ARCHITECTURES["sd15"]["vae"]).to(dtype).requires_grad_(False)
latents = torch.randn(images, 4, side, side, device=device)


def ms_per_image(layout, chunk, repeats=3):
    def decode():
        with torch.no_grad():
            return [vae.decode(z.to(dtype).contiguous(memory_format=layout)).sample for z in latents.split(chunk)]

    decode()  # warm-up: cuDNN's algorithm search when benchmarking, compilation
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        decode()
    sync()
    return (time.perf_counter() - start) / repeats / images * 1e3


# Pipeline.decode today: contiguous layout, chunks of 8, cuDNN's heuristics (torch.backends.cudnn.benchmark off).
for layout in (torch.contiguous_format, torch.channels_last):
    vae.to(memory_format=layout)
    for chunk in chunks:
        for search in (False, True):
            torch.backends.cudnn.benchmark = search
            print(f"{dtype}, {layout}, chunk {chunk}, cudnn.benchmark {search}: "
                  f"{ms_per_image(layout, chunk):.2f} ms per image", flush=True)
torch.backends.cudnn.benchmark = False
vae.to(memory_format=torch.contiguous_format)
vae.decoder = torch.compile(vae.decoder)
print(f"compiled, {dtype}, contiguous, chunk {chunks[0]}: {ms_per_image(torch.contiguous_format, chunks[0]):.2f} "
      "ms per image", flush=True)
