"""An ELS machine inside diffusers: a stock pipeline, a scheduler swap, save and load, class labels.

    python examples/diffusers_pipeline.py --out runs/diffusers        # ~1 min on 2 CPU cores

Needs `pip install 'elsfast[diffusers]'`. Uses the 2,000-digit MNIST subset shipped with elsfast (the first
`--limit` digits), so it needs no data directory. Writes `OUT/pipeline/` (a saved pipeline: the machine's
configuration and the dataset reference, not the images) and `OUT/digits.png` (class-conditional samples).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DPMSolverMultistepScheduler

import elsfast
from elsfast.common.imageio import save_grid
from elsfast.integrations.diffusers import ELSPipeline, ELSUNet, make_ddim_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="training digits (default 200)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps (default 10)")
    parser.add_argument("--out", type=Path, default=Path("runs/diffusers"), help="output directory")
    args = parser.parse_args()

    # 1. A stock DDIMPipeline. make_ddim_scheduler(n) reproduces elsfast.sample(..., steps=n) when the pipeline
    #    runs n - 1 steps; connected to the pipeline (`pipe.unet.follow(pipe)`), ELSUNet reads the noise levels
    #    from the pipeline's current scheduler at every call.
    machine = elsfast.ScoreMachine.from_dataset("mnist-embedded", limit=args.limit)
    pipe = DDIMPipeline(
        unet=ELSUNet(machine, patch_size="MNIST_ResNet_zeros"), scheduler=make_ddim_scheduler(args.steps)
    )
    pipe.unet.follow(pipe)
    pipe.set_progress_bar_config(disable=True)

    def run(p, **kw):
        g = torch.Generator().manual_seed(0)
        return p(batch_size=4, generator=g, num_inference_steps=args.steps - 1, output_type="pt", **kw).images

    ddim = run(pipe)
    reference = elsfast.sample(machine, 4, steps=args.steps, patch_size="MNIST_ResNet_zeros", seed=0, progress=False)
    print(
        f"DDIMPipeline vs elsfast.sample: max |difference| {(ddim - (reference / 2 + 0.5).clamp(0, 1)).abs().max():.1e}"
    )

    # 2. Swapping the scheduler the diffusers way: the model follows the pipeline's new scheduler (here the same
    #    noise levels visited from the last training timestep: "trailing" spacing).
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", steps_offset=0)
    trailing = run(pipe)
    print(f"DDIM, trailing spacing vs leading: mean |difference| {(trailing - ddim).abs().mean():.3f}")

    # 3. Save and load: the unet folder holds config.json (machine configuration, training set SHA-256, dataset
    #    reference); loading rebuilds the machine and refuses a training set that changed.
    pipe.save_pretrained(args.out / "pipeline")
    loaded = DDIMPipeline.from_pretrained(args.out / "pipeline")
    loaded.unet.follow(loaded)
    loaded.set_progress_bar_config(disable=True)
    same = torch.equal(run(loaded), trailing)
    print(f"reloaded pipeline: {'same images' if same else 'DIFFERENT images'}")

    # 4. Class labels: ELSPipeline passes them to the machine (one dictionary per class); it runs any scheduler,
    #    here DPM-Solver++ built from the saved scheduler's configuration.
    scheduler = DPMSolverMultistepScheduler.from_config(loaded.scheduler.config, algorithm_type="dpmsolver++")
    labeled = ELSPipeline(unet=loaded.unet, scheduler=scheduler)
    labeled.set_progress_bar_config(disable=True)
    classes = sorted(set(machine.labels.tolist()))  # the digits among the first --limit training images
    digits = labeled(
        class_labels=classes,
        generator=torch.Generator().manual_seed(1),
        num_inference_steps=args.steps - 1,
        output_type="pt",
    ).images
    path = save_grid(digits, args.out / "digits.png", nrow=len(classes), value_range=(0, 1))
    print(f"class-conditional digits {classes}: {path}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
