"""A two-tower task and its encoders, as a user would build them (shared by bench_two_tower.py and
bench_dynmm.py; not part of the package).

Data (synthetic, seeded): token ids [n, T] and RGB images [n, 3, S, S]. A "both" sample's label is
2 a + b (10 classes): a in 0..4 is which key token (ids 0..4) occurs once in the sequence (the other
tokens are ids 5..vocab-1), b in 0..1 is the colour (red / green) of a bright square placed at random
in noise. So the label needs both modalities. With p_image_only > 0 that fraction of samples is
"image-only": the tokens are all filler and the image holds a bar across it, horizontal or vertical,
which alone gives the label 10 + c (c = 0 / 1); these samples do not need the token tower.

Encoders of different widths and output scales: TokenEncoder (a 2-layer Transformer over the ids, width
48, outputs times `scale`) and ConvEncoder (two stride-2 convolutions, width 32, outputs times `scale`).
Each returns pooled vectors [B, width], or with pool=False the sequence [B, T, 48] / the channel-last
feature map [B, S/4, S/4, 32].
"""
import torch
from torch import nn

CLASSES_BOTH, CLASSES = 10, 12


def make_data(n: int, seed: int, T: int = 16, vocab: int = 32, size: int = 32, p_image_only: float = 0.0):
    """{'tokens': [n, T] int64, 'image': [n, 3, size, size] float32, 'y': [n] int64, 'image_only': [n] bool}."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 5, (n,), generator=g)
    b = torch.randint(0, 2, (n,), generator=g)
    tokens = torch.randint(5, vocab, (n, T), generator=g)
    tokens[torch.arange(n), torch.randint(0, T, (n,), generator=g)] = a
    image = 0.5 * torch.randn(n, 3, size, size, generator=g)
    q = size // 4
    rows = torch.randint(0, size - q + 1, (n,), generator=g)
    cols = torch.randint(0, size - q + 1, (n,), generator=g)
    for i in range(n):
        image[i, b[i], rows[i]:rows[i] + q, cols[i]:cols[i] + q] += 2.0
    y = 2 * a + b
    only = torch.rand(n, generator=g) < p_image_only
    if only.any():
        k = int(only.sum())
        c = torch.randint(0, 2, (k,), generator=g)
        tokens[only] = torch.randint(5, vocab, (k, T), generator=g)
        img = 0.5 * torch.randn(k, 3, size, size, generator=g)
        at = torch.randint(0, size - 4, (k,), generator=g)
        for j in range(k):
            if c[j]:
                img[j, :, :, at[j]:at[j] + 4] += 2.0   # vertical bar
            else:
                img[j, :, at[j]:at[j] + 4, :] += 2.0   # horizontal bar
        image[only] = img
        y[only] = CLASSES_BOTH + c
    return dict(tokens=tokens, image=image, y=y, image_only=only)


class TokenEncoder(nn.Module):
    """ids [B, T] -> [B, width] (mean over tokens) or [B, T, width] (pool=False), times `scale`."""

    def __init__(self, vocab: int = 32, width: int = 48, T: int = 16, layers: int = 2, scale: float = 1.0,
                 pool: bool = True):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(T, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.tf = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.scale, self.pool, self.width = scale, pool, width

    def forward(self, ids):
        h = self.tf(self.emb(ids) + self.pos[: ids.shape[1]])
        return (h.mean(1) if self.pool else h) * self.scale


class ConvEncoder(nn.Module):
    """images [B, 3, S, S] -> [B, width] (mean over the map) or [B, S/4, S/4, width] (pool=False), times `scale`."""

    def __init__(self, width: int = 32, scale: float = 1.0, pool: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, width, 3, 2, 1), nn.ReLU())
        self.scale, self.pool, self.width = scale, pool, width

    def forward(self, img):
        h = self.net(img)
        return (h.mean((2, 3)) if self.pool else h.permute(0, 2, 3, 1)) * self.scale
