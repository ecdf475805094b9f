"""The trained networks the machines are compared with (SPEC section 3, paper App. C), and their sampler adapter.

Shapes: B batch, C image channels, H x W image size. Every network maps a noisy image, its time and (for
class-conditional networks) its label to the noise it predicts:

    model(x [B, C, H, W] float, t [B] float in [0, 1], labels [B] int64 | None) -> eps [B, C, H, W]

`t` is the diffusion time of the training schedule (legacy cosine by default, abar(t) = cos^2(pi/2 t / 1.008)),
fed through a sinusoidal embedding of 1000 t and a two-layer MLP; a class embedding is added to that vector
when `num_classes` is set. Each block adds a learned per-channel projection of the embedding (an additive,
bias-like term): no normalisation layers anywhere, as in the paper.

- `ResNet`: 3x3 conv C -> channels, `blocks` residual layers h <- h + relu(conv3x3(h) + emb), 3x3 conv back to
  C. With the paper's 6 blocks that is 8 3x3 convolutions, a receptive field of exactly 17 x 17.
- `UNet`: `len(channels)` scales (64/128/256 by default). Each level has residual blocks of two 3x3 convs;
  3x3 stride-2 convs go down, nearest-neighbour upsampling + 3x3 conv goes up, skips are concatenated. No
  attention. H and W must be divisible by 2^(levels - 1) (4 by default): both 28 x 28 MNIST (28 -> 14 -> 7)
  and 32 x 32 images work as they are; other sizes raise ValueError (pad them, e.g. `datasets.load(pad_to=32)`).
- the same UNet with self-attention (arch "unet-sa", the paper's Section 6 network, after Ho et al. 2020):
  `attention` lists the levels (0 = full resolution) whose residual blocks are each followed by a global
  self-attention block over all H x W positions (GroupNorm, one 1x1 qkv projection, `heads` heads, a 1x1 output
  projection, residual); the middle block gets one too when the bottom level is listed. The default for
  "unet-sa" is every level below full resolution: levels 1 and 2, 16 x 16 and 8 x 8, on 32 x 32 images.
  Attention sees the whole image, so such a network is not local, which is what the paper's last Table-1 row
  tests (with circular padding it still commutes with circular shifts by multiples of 2^(levels - 1)).

Padding is `zeros` or `circular` for every convolution. A circular ResNet commutes with circular shifts; a
circular UNet with shifts by multiples of 2^(levels - 1).

`build_model(config)` / `model_config(model)` convert to and from a plain dict (what checkpoints store).
`NetworkDenoiser` turns a network into the `denoiser(x, abar, step) -> x0` callable of `elsfast.ddim_sample`,
so networks and machines run through the one sampler; `eps_at` gives the network's eps at a noise level abar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..common.checks import labels_per_sample
from ..common.schedules import t_of_abar, x0_from_eps

__all__ = [
    "ARCHS",
    "PADDINGS",
    "NetworkDenoiser",
    "ResNet",
    "UNet",
    "build_model",
    "eps_at",
    "model_config",
]

PADDINGS = ("zeros", "circular")
ARCHS = ("resnet", "unet", "unet-sa")
TIME_FREQS = 128
"""Width of the sinusoidal time features (before the MLP)."""


def _check_padding(padding: str) -> str:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return padding


def _conv3x3(cin: int, cout: int, padding: str, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, padding_mode=padding)


def sinusoidal(t: torch.Tensor, dim: int = TIME_FREQS) -> torch.Tensor:
    """Sinusoidal features `[B, dim]` of `1000 t` (DDPM's integer-step scale), periods up to 10000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class _Embedding(nn.Module):
    """Time (sinusoid + MLP) plus, if `num_classes` is set, a learned class vector: `[B, dim]`."""

    def __init__(self, dim: int, num_classes: int | None):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQS, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.num_classes = num_classes
        self.label = nn.Embedding(num_classes, dim) if num_classes else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must have shape [{b}] (one time per image), got {list(t.shape)}")
        e = self.mlp(sinusoidal(t).to(self.mlp[0].weight.dtype))
        if self.label is None:
            if labels is not None:
                raise ValueError("labels were given to an unconditional network (built with num_classes=None)")
            return e
        if labels is None:
            raise ValueError(f"this network is class-conditional ({self.num_classes} classes): pass labels [B]")
        labels = torch.as_tensor(labels, device=x.device, dtype=torch.int64)
        if labels.dim() == 0:
            labels = labels.expand(b)
        if labels.shape != (b,):
            raise ValueError(f"labels must have shape [{b}] (one label per image), got {list(labels.shape)}")
        return e + self.label(labels)


class ResNet(nn.Module):
    """The paper's minimal ResNet: 8 3x3 convolutions in all (receptive field 17 x 17 with `blocks=6`).

    conv3x3(C -> channels), then `blocks` times h <- h + relu(conv3x3(h) + W_k emb), then conv3x3(channels -> C).
    `emb_dim` (default `channels`) is the width of the time/class embedding vector.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 256,
        blocks: int = 6,
        padding: str = "zeros",
        num_classes: int | None = None,
        emb_dim: int | None = None,
    ):
        super().__init__()
        self.in_channels, self.channels, self.blocks = int(in_channels), int(channels), int(blocks)
        self.padding = _check_padding(padding)
        self.num_classes = int(num_classes) if num_classes else None
        self.emb_dim = int(emb_dim or channels)
        self.embed = _Embedding(self.emb_dim, self.num_classes)
        self.conv_in = _conv3x3(self.in_channels, self.channels, padding)
        self.convs = nn.ModuleList(_conv3x3(self.channels, self.channels, padding) for _ in range(self.blocks))
        self.emb_proj = nn.ModuleList(nn.Linear(self.emb_dim, self.channels) for _ in range(self.blocks))
        self.conv_out = _conv3x3(self.channels, self.in_channels, padding)

    @property
    def receptive_field(self) -> int:
        """Side of the (square) maximal receptive field: 1 + 2 * (number of 3x3 convolutions)."""
        return 1 + 2 * (self.blocks + 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        e = F.silu(self.embed(x, t, labels))
        h = self.conv_in(x)
        for conv, proj in zip(self.convs, self.emb_proj, strict=True):
            h = h + F.relu(conv(h) + proj(e)[:, :, None, None].to(h.dtype))
        return self.conv_out(h)


class _ResBlock(nn.Module):
    """Two 3x3 convs with the embedding added after the first; identity (or 1x1 conv) skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, padding: str):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, padding)
        self.proj = nn.Linear(emb_dim, cout)
        self.conv2 = _conv3x3(cout, cout, padding)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x) + self.proj(e)[:, :, None, None].to(x.dtype))
        return self.skip(x) + self.conv2(h)


class _SelfAttention(nn.Module):
    """Residual global self-attention over the H x W positions of `[B, c, H, W]` (Ho et al. 2020): GroupNorm,
    a 1x1 conv to queries, keys and values, `heads` heads of scaled dot-product attention, a 1x1 conv out."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention heads ({heads}) must divide the channels ({channels})")
        self.heads = int(heads)
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # [b, heads, h * w, c / heads]
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """A UNet: `len(channels)` scales, `blocks` residual blocks per level and path, optional self-attention.

    Encoder level i: `blocks` x ResBlock(-> channels[i]), then (except at the bottom) a 3x3 stride-2 conv.
    Bottom: one more ResBlock. Decoder level i (from the bottom up): nearest x2 upsampling + 3x3 conv,
    concatenate the encoder's level-i output, `blocks` x ResBlock(-> channels[i]). Output: relu, 3x3 conv to C.
    H and W must be divisible by 2^(len(channels) - 1). With `attention` (level indices, 0 = full resolution),
    every ResBlock of those levels, on both paths, is followed by a `heads`-head self-attention block, and the
    middle block too when the bottom level is listed; without it the network is convolution-only.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256),
        padding: str = "zeros",
        num_classes: int | None = None,
        blocks: int = 1,
        emb_dim: int | None = None,
        attention: Sequence[int] = (),
        heads: int = 1,
    ):
        super().__init__()
        self.in_channels = int(in_channels)
        self.channels = tuple(int(c) for c in channels)
        if not self.channels:
            raise ValueError("channels must list at least one width")
        self.attention = tuple(sorted({int(level) for level in attention}))
        if any(not 0 <= level < len(self.channels) for level in self.attention):
            raise ValueError(f"attention levels must lie in 0..{len(self.channels) - 1}, got {list(attention)}")
        self.heads = int(heads)
        if self.heads < 1:
            raise ValueError(f"heads must be at least 1, got {heads}")
        self.blocks = int(blocks)
        if self.blocks < 1:
            raise ValueError(f"blocks must be at least 1, got {blocks}")
        self.padding = _check_padding(padding)
        self.num_classes = int(num_classes) if num_classes else None
        self.emb_dim = int(emb_dim or 4 * self.channels[0])
        self.embed = _Embedding(self.emb_dim, self.num_classes)
        ch, d, p = self.channels, self.emb_dim, padding
        self.conv_in = _conv3x3(self.in_channels, ch[0], p)
        self.down = nn.ModuleList()
        self.down_attention = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = ch[0]
        for i, c in enumerate(ch):
            self.down.append(nn.ModuleList(_ResBlock(prev if k == 0 else c, c, d, p) for k in range(self.blocks)))
            self.down_attention.append(self._attention_blocks(i, c))
            prev = c
            if i < len(ch) - 1:
                self.downsample.append(_conv3x3(c, c, p, stride=2))
        self.mid = _ResBlock(ch[-1], ch[-1], d, p)
        bottom = len(ch) - 1
        self.mid_attention = _SelfAttention(ch[-1], self.heads) if bottom in self.attention else nn.Identity()
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        self.up_attention = nn.ModuleList()
        for i in range(len(ch) - 2, -1, -1):
            self.upsample.append(_conv3x3(ch[i + 1], ch[i + 1], p))
            self.up.append(
                nn.ModuleList(
                    _ResBlock(ch[i + 1] + ch[i] if k == 0 else ch[i], ch[i], d, p) for k in range(self.blocks)
                )
            )
            self.up_attention.append(self._attention_blocks(i, ch[i]))
        self.conv_out = _conv3x3(ch[0], self.in_channels, p)

    def _attention_blocks(self, level: int, channels: int) -> nn.ModuleList:
        """One self-attention block per ResBlock of `level` if it is listed in `attention`, else none."""
        count = self.blocks if level in self.attention else 0
        return nn.ModuleList(_SelfAttention(channels, self.heads) for _ in range(count))

    @property
    def factor(self) -> int:
        """H and W must be multiples of this (2 to the number of downsamplings)."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h_, w_ = x.shape[-2:]
        if h_ % self.factor or w_ % self.factor:
            raise ValueError(
                f"UNet with {len(self.channels)} scales needs H and W divisible by {self.factor}, got {h_}x{w_} "
                f"(pad the images, e.g. datasets.load(..., pad_to=32))"
            )
        e = F.silu(self.embed(x, t, labels))
        h = self.conv_in(x)
        skips = []
        for i, (level, attend) in enumerate(zip(self.down, self.down_attention, strict=True)):
            h = _level(level, attend, h, e)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid_attention(self.mid(h, e))
        decoder = zip(self.upsample, self.up, self.up_attention, reversed(skips[:-1]), strict=True)
        for up, level, attend, skip in decoder:
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = _level(level, attend, torch.cat([h, skip], dim=1), e)
        return self.conv_out(F.relu(h))


def _level(blocks: nn.ModuleList, attention: nn.ModuleList, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """A UNet level: its ResBlocks in turn, each followed by its attention block where the level has them."""
    for k, block in enumerate(blocks):
        h = block(h, e)
        if attention:
            h = attention[k](h)
    return h


# ------------------------------------------------------------------------------------------------------------
# plain configs


def model_config(model: nn.Module) -> dict:
    """The plain dict (str / int / list / None values) that `build_model` turns back into the same architecture."""
    if isinstance(model, ResNet):
        arch, channels = "resnet", model.channels
    elif isinstance(model, UNet):
        arch, channels = ("unet-sa" if model.attention else "unet"), list(model.channels)
    else:
        raise ValueError(f"model_config knows ResNet and UNet, got {type(model).__name__}")
    config = {
        "arch": arch,
        "in_channels": model.in_channels,
        "channels": channels,
        "blocks": model.blocks,
        "padding": model.padding,
        "num_classes": model.num_classes,
        "emb_dim": model.emb_dim,
    }
    if arch == "unet-sa":
        config.update(attention=list(model.attention), heads=model.heads)
    return config


_DEFAULTS = {
    "resnet": {"channels": 256, "blocks": 6},
    "unet": {"channels": [64, 128, 256], "blocks": 1},
    "unet-sa": {"channels": [64, 128, 256], "blocks": 1, "heads": 1},
}


def build_model(config: dict) -> nn.Module:
    """A fresh (randomly initialised) network from a plain dict.

    Keys: `arch` ("resnet" | "unet" | "unet-sa", required), `in_channels` (1), `channels` (ResNet: int, 256;
    UNet: list, [64, 128, 256]), `blocks` (ResNet: 6 residual layers; UNet: 1 block per level), `padding`
    ("zeros"), `num_classes` (None = unconditional), `emb_dim` (None = the architecture's default); "unet-sa"
    only: `attention` (levels with self-attention; default every level below full resolution, [1, 2] for three
    scales: 16x16 and 8x8 on 32x32 images) and `heads` (1). Unknown keys raise.
    """
    config = dict(config)
    arch = str(config.pop("arch", "")).lower()
    if arch not in ARCHS:
        raise ValueError(f"model config needs arch in {ARCHS}, got {arch or None!r}")
    allowed = {"in_channels", "channels", "blocks", "padding", "num_classes", "emb_dim"}
    if arch == "unet-sa":
        allowed |= {"attention", "heads"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; known: {sorted(allowed)}")
    kw = {**_DEFAULTS[arch], **{k: v for k, v in config.items() if v is not None or k == "num_classes"}}
    if arch == "resnet":
        if not isinstance(kw["channels"], int):
            raise ValueError(f"a ResNet's channels is one int, got {kw['channels']!r}")
        return ResNet(**kw)
    if isinstance(kw["channels"], int):
        raise ValueError(f"a UNet's channels is a list of widths per scale, got {kw['channels']!r}")
    if arch == "unet-sa" and kw.get("attention") is None:  # every level below full resolution, as Ho et al.
        kw["attention"] = list(range(1, len(kw["channels"]))) or [0]
    return UNet(**kw)


# ------------------------------------------------------------------------------------------------------------
# the sampler adapter


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def eps_at(
    model: nn.Module,
    x: torch.Tensor,
    abar: float,
    labels: torch.Tensor | int | Sequence[int] | None = None,
    *,
    schedule: str | Callable[[float], float] = "cosine-legacy",
    batch_size: int | None = None,
) -> torch.Tensor:
    """The network's noise prediction eps `[B, C, H, W]` for noisy images `x` `[B, C, H, W]` at level `abar`.

    `schedule` is the schedule the network was trained on (it maps abar back to the network's time input).
    `labels`: one int or one per image (class-conditional networks). Runs under no_grad on the model's device
    and dtype, `batch_size` images at a time (default all), and returns on `x`'s device and dtype.
    """
    device, dtype = _model_device_dtype(model)
    n = x.shape[0]
    labels = labels_per_sample(labels, n)
    t = torch.full((n,), t_of_abar(abar, schedule), dtype=torch.float32, device=device)
    step = n if batch_size is None else max(1, int(batch_size))
    out = []
    for lo in range(0, n, step):
        xb = x[lo : lo + step].to(device, dtype)
        lb = None if labels is None else labels[lo : lo + step].to(device)
        out.append(model(xb, t[lo : lo + step], lb).to(x.device, x.dtype))
    return torch.cat(out) if len(out) > 1 else out[0]


class NetworkDenoiser:
    """A network as the `denoiser(x, abar, step) -> x0` of `elsfast.ddim_sample`.

    x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) (`elsfast.common.schedules.x0_from_eps`). `model` is a network
    (`nn.Module`, eps = `eps_at(model, x, abar, labels)`; `schedule` is the schedule it was trained on, used only
    to turn abar back into its time input, so the sampler may run on any grid) or any callable
    `eps_fn(x, abar, labels) -> eps` (then `schedule` and `batch_size` are not used). `labels`: one int or one per
    sample for class-conditional networks (passed to an eps_fn as given).

        x0 = ddim_sample(NetworkDenoiser(model, labels=y), torch.randn(16, 1, 32, 32), steps=20)
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: str | Callable[[float], float] = "cosine-legacy",
        labels: torch.Tensor | int | Sequence[int] | None = None,
        *,
        batch_size: int | None = None,
    ):
        self.model = model.eval() if isinstance(model, nn.Module) else model
        self.schedule = schedule
        self.labels = labels
        self.batch_size = batch_size

    def eps(self, x: torch.Tensor, abar: float) -> torch.Tensor:
        """The predicted noise `[B, C, H, W]` at noise level abar, in x's dtype and on its device."""
        if not isinstance(self.model, nn.Module):
            return self.model(x, abar, self.labels).to(x)
        return eps_at(self.model, x, abar, self.labels, schedule=self.schedule, batch_size=self.batch_size)

    def __call__(self, x: torch.Tensor, abar: float, step: int | None = None) -> torch.Tensor:
        return x0_from_eps(x, self.eps(x, abar), abar)
