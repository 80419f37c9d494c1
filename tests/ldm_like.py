"""Module trees named like ldm/sgm/Forge UNets (`input_blocks`, `middle_block`,
`output_blocks`, `SpatialTransformer` at index 1), built from our own tiny classes."""

import torch
from torch import nn

from fam.bench_ldm import CrossAttention   # the ldm attention interface, A1111's SDPA forward


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, heads)
        self.attn2 = CrossAttention(dim, heads, context_dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        return self.attn2(self.norm2(x), context=context) + x


class SpatialTransformer(nn.Module):
    def __init__(self, dim, heads, depth, context_dim):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(dim, heads, context_dim) for _ in range(depth))

    def forward(self, x, context):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        for blk in self.transformer_blocks:
            t = blk(t, context)
        return t.transpose(1, 2).reshape(b, c, h, w) + x


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x, context):
        return torch.nn.functional.silu(self.conv(x))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, context):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, context, size=None):
        return self.conv(torch.nn.functional.interpolate(x, size=size, mode="nearest"))


class Seq(nn.ModuleList):
    """TimestepEmbedSequential stand-in."""

    def forward(self, x, context, size=None):
        for m in self:
            x = m(x, context, size) if isinstance(m, Upsample) else m(x, context)
        return x


class LdmUNet(nn.Module):
    """`attn_levels`/`depths`: which levels have transformers and how deep (SD1: levels 0-2,
    depth 1; SDXL: levels 1-2 with depths 2 and 10). Forward: (x, context) -> eps."""

    def __init__(self, ch=(16, 32, 32, 32), attn_levels=(0, 1, 2), depths=None, heads=2,
                 context_dim=8, res_blocks=2, mid_depth=1):
        super().__init__()
        depths = depths or {lvl: 1 for lvl in attn_levels}
        self.input_blocks = nn.ModuleList([Seq([nn.Identity()])])
        self.input_blocks[0] = Seq([_ConvIn(4, ch[0])])
        skips, cur = [ch[0]], ch[0]
        for lvl, c in enumerate(ch):
            for _ in range(res_blocks):
                layers = [ResBlock(cur, c)]
                cur = c
                if lvl in depths:
                    layers.append(SpatialTransformer(c, heads, depths[lvl], context_dim))
                self.input_blocks.append(Seq(layers))
                skips.append(cur)
            if lvl != len(ch) - 1:
                self.input_blocks.append(Seq([Downsample(cur)]))
                skips.append(cur)
        self.middle_block = Seq([ResBlock(cur, cur), SpatialTransformer(
            cur, heads, mid_depth, context_dim), ResBlock(cur, cur)])
        self.output_blocks = nn.ModuleList()
        for lvl in reversed(range(len(ch))):
            c = ch[lvl]
            for i in range(res_blocks + 1):
                layers = [ResBlock(cur + skips.pop(), c)]
                cur = c
                if lvl in depths:
                    layers.append(SpatialTransformer(c, heads, depths[lvl], context_dim))
                if lvl and i == res_blocks:
                    layers.append(Upsample(c))
                self.output_blocks.append(Seq(layers))
        self.out = nn.Conv2d(cur, 4, 3, padding=1)

    def forward(self, x, context):
        hs = []
        for blk in self.input_blocks:
            x = blk(x, context)
            hs.append(x)
        x = self.middle_block(x, context)
        for blk in self.output_blocks:
            skip = hs.pop()
            x = torch.cat([x, skip], 1)
            size = hs[-1].shape[-2:] if hs else None
            x = blk(x, context, size)
        return self.out(x)


class _ConvIn(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x, context):
        return self.conv(x)


def sd1_like(seed=0):
    torch.manual_seed(seed)
    return LdmUNet(ch=(16, 32, 32, 32), attn_levels=(0, 1, 2)).eval()


def sdxl_like(seed=0):
    torch.manual_seed(seed)
    return LdmUNet(ch=(16, 32, 32), depths={1: 2, 2: 3}, mid_depth=3).eval()
