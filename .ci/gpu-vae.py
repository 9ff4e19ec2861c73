"""Issue 8, for a lent GPU: the VAE decode of the candidates is the largest share of an eager SD1.5 prompt (0.88 of
2.05 s on an H200, 182 TFLOP/s). Time SD1.5's VAE (random weights) per 512-px image over memory layout, chunk size
(Pipeline.decode's `chunk`), dtype and torch.compile, to pick what to change. Run by `.ci/gpu-check vae`; on a
machine without CUDA it runs the same steps on a few 64-px images, as a smoke test of this script."""
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import diffusion as D  # noqa: E402

cuda = torch.cuda.is_available()
device, side, images = ("cuda", 64, 64) if cuda else ("cpu", 8, 4)  # latent side: 64 is a 512-px image
sync = torch.cuda.synchronize if cuda else lambda: None
vae = D.random_pipeline_parts("sd15", tempfile.mkdtemp(), device=device)["vae"].requires_grad_(False)
latents = torch.randn(images, 4, side, side, device=device)


def ms_per_image(decode, repeats=3):
    decode()  # warm-up: cuDNN's algorithm search, compilation
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        decode()
    sync()
    return (time.perf_counter() - start) / repeats / images * 1e3


def decoder(dtype, layout, chunk):
    def decode():
        with torch.no_grad():
            return [vae.decode(z.to(dtype).contiguous(memory_format=layout)).sample for z in latents.split(chunk)]
    return decode


for dtype in (torch.float16, torch.bfloat16) if cuda else (torch.float32,):
    vae.to(dtype)
    for layout in (torch.contiguous_format, torch.channels_last):
        vae.to(memory_format=layout)
        for chunk in (8, 16, 32) if cuda else (2,):
            print(f"{dtype}, {layout}, chunk {chunk}: {ms_per_image(decoder(dtype, layout, chunk)):.2f} ms per image",
                  flush=True)
vae.decoder = torch.compile(vae.decoder)  # the layout and dtype last set
dtype, chunk = vae.dtype, 8 if cuda else 2
print(f"compiled, {dtype}, channels_last, chunk {chunk}: "
      f"{ms_per_image(decoder(dtype, torch.channels_last, chunk)):.2f} ms per image")
