"""Global 3D LUTs from a harmonization: fit, apply, and read/write Adobe/Resolve ``.cube`` files.

The zero-shot harmonization paper proposes handing its color change to a human editor as a 3D LUT
(appendix E) but its code never implements it. A LUT maps every input RGB to an output RGB through a
lattice of ``N x N x N`` nodes (N = 17, 33 or 65) with trilinear interpolation in between; Photoshop,
DaVinci Resolve, Premiere and ffmpeg (``lut3d``) read it as a ``.cube`` file.

**Fitting: lattice regression with a smoothness term.** The unknowns are the node values ``L``
themselves, and the data term is what the LUT will actually do: every foreground pixel's composite color
``x_i`` is mapped by trilinear interpolation of the lattice, ``Phi(x_i) L``, and compared with its
harmonized color ``y_i`` (mask-weighted least squares; Garcia & Gupta, "Lattice regression", NIPS 2009).
A foreground covers only a small part of the RGB cube, so most cells hold no data. They are filled by the
regulariser: the membrane energy ``integral |grad d|^2`` of the *deviation* ``d = f - A`` of the LUT from the
global affine least-squares fit ``A`` of the same pairs (discrete: squared first differences between
neighbouring nodes, scaled with the lattice spacing so the same ``smoothness`` means the same thing at 17,
33 and 65). Consequences:

- colors the foreground lacks get a smooth blend of the nearby fitted corrections, tending to the global
  affine color change far from any data (never to the identity, never to noise);
- a pure affine color change is reproduced exactly over the whole cube (zero deviation costs nothing, and
  trilinear interpolation of an affine map is exact), while a smooth nonlinear change (gamma, tone curves,
  hue-dependent shifts) is reproduced to within the lattice's interpolation error on the colors seen;
- a first-order energy keeps the linear system well conditioned (conjugate gradients converge in O(N)
  iterations; a second-order thin-plate energy, which we tried first, needs O(N^2) and was 10-30x slower).

Why not fit a global affine/polynomial model and sample it? An affine model cannot express tone curves or
hue-dependent changes, and a polynomial of useful degree oscillates outside the colors it saw. Why not
splat samples into cells and fill holes? Splatting averages nearby colors (a blur of the mapping) and
hole filling ignores how well the interpolated LUT matches the data; lattice regression fits it directly.

The system (one per output channel, same sparse matrix) is solved by Jacobi-preconditioned conjugate
gradients, coarse to fine (17 -> 33 -> 65, each level warm-started from the previous one, the first from
the affine fit), to a relative residual of ``CG_TOL``. The data term is accumulated once per level as 8x8
blocks per occupied cell (a sparse matrix), so an iteration costs O(occupied cells + nodes) whatever the
number of pixels. Float64, deterministic.

``.cube`` format (Adobe "Cube LUT Specification 1.0"): text lines; ``#`` comments; optional
``TITLE "text"``; ``LUT_3D_SIZE N`` (2..256); optional ``DOMAIN_MIN r g b`` / ``DOMAIN_MAX r g b`` (default
0 0 0 / 1 1 1); then N^3 lines ``R G B`` with the red input index changing fastest, then green, then
blue. Resolve's ``LUT_3D_INPUT_RANGE min max`` is read as the domain. 1D LUTs are rejected with a clear error.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core import cancel as cancelling
from ..core import image_io, images
from ..core.errors import InputError

LUT_SIZES = (17, 33, 65)
DEFAULT_SIZE = 33
DEFAULT_SMOOTHNESS = 1e-4  # weight of the membrane energy against the mean squared color error
MAX_CUBE_SIZE = 256  # the spec's upper bound for LUT_3D_SIZE
CG_TOL = 1e-5  # relative residual: the table is then within ~1e-3 of the converged one (< one 8-bit level)
CG_MAX_ITERS = 1000
APPLY_STRIP_PIXELS = 1 << 20


@dataclass
class Lut3D:
    """A 3D LUT: ``table`` ``[N, N, N, 3]`` float32 indexed ``[blue, green, red]`` (so flattening it gives the
    ``.cube`` order, red fastest), mapping ``domain_min..domain_max`` per channel."""

    table: torch.Tensor
    domain_min: tuple[float, float, float] = (0.0, 0.0, 0.0)
    domain_max: tuple[float, float, float] = (1.0, 1.0, 1.0)
    title: str = ""
    info: dict = field(default_factory=dict)  # fit diagnostics (samples, residual, CG iterations)

    def __post_init__(self):
        t = self.table
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[-1] != 3 or not (
                t.shape[0] == t.shape[1] == t.shape[2]):
            raise InputError(f"a 3D LUT table must be [N,N,N,3], got {getattr(t, 'shape', type(t))}")
        if not 2 <= t.shape[0] <= MAX_CUBE_SIZE:
            raise InputError(f"LUT size must be 2..{MAX_CUBE_SIZE}, got {t.shape[0]}")
        if any(hi <= lo for lo, hi in zip(self.domain_min, self.domain_max)):
            raise InputError(f"LUT domain must have min < max per channel, got {self.domain_min}..{self.domain_max}")

    @property
    def size(self) -> int:
        return int(self.table.shape[0])


def identity_table(size: int) -> torch.Tensor:
    """``[N,N,N,3]`` identity lattice on 0..1 (indexed [b, g, r], channels r, g, b)."""
    v = torch.linspace(0, 1, size, dtype=torch.float64)
    b, g, r = torch.meshgrid(v, v, v, indexing="ij")
    return torch.stack([r, g, b], -1)


# ------------------------------------------------------------------------------------------ apply
def _normalise(rgb: torch.Tensor, lut: Lut3D) -> torch.Tensor:
    lo = torch.tensor(lut.domain_min, dtype=rgb.dtype)
    hi = torch.tensor(lut.domain_max, dtype=rgb.dtype)
    return ((rgb - lo) / (hi - lo)).clamp(0, 1)


def lookup(rgb: torch.Tensor, lut: Lut3D) -> torch.Tensor:
    """Trilinear LUT lookup of colors ``[..., 3]`` (clamped to the domain), as ``grid_sample`` on the 5D
    table: the table ``[1, 3, N(b), N(g), N(r)]`` is sampled at (x=r, y=g, z=b), node ``k`` at ``k/(N-1)``."""
    shape = rgb.shape
    u = _normalise(rgb.reshape(-1, 3).float(), lut) * 2 - 1
    vol = lut.table.float().permute(3, 0, 1, 2)[None]
    out = F.grid_sample(vol, u[None, None, None], mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, :, 0, 0].T.reshape(shape)


def apply_lut(image: torch.Tensor, lut: Lut3D, mask: torch.Tensor | None = None, feather: int = 0,
              strip_pixels: int = APPLY_STRIP_PIXELS, cancel: cancelling.Cancel = None) -> torch.Tensor:
    """Apply ``lut`` to IMAGE ``[B,H,W,3]`` (any size), in strips of rows (bounded memory). With a ``mask``
    the result is blended in inside it (``feather`` px inwards) and the rest stays bit for bit. ``cancel``
    is checked before every strip."""
    if not isinstance(lut, Lut3D):
        raise InputError(f"lut must be a Lut3D (HARMONIZE_LUT), got {type(lut).__name__}")
    image = images.image_batch(image)
    b, h, w = image.shape[:3]
    out = torch.empty(b, h, w, 3, dtype=torch.float32)
    rows = max(1, int(strip_pixels) // w)
    for i in range(b):
        for y0 in range(0, h, rows):
            cancelling.check(cancel)
            out[i, y0:y0 + rows] = lookup(image[i, y0:y0 + rows], lut).clamp_(0, 1)
    if mask is None:
        return out
    image, mask = images.image_and_mask(image, mask)
    out, mask = images.match_batches(out, mask)
    return images.paste(out, image.expand_as(out), mask, feather, cancel)


# -------------------------------------------------------------------------------------------- fit
def _corner_offsets(size: int) -> torch.Tensor:
    """Flat node offsets of a cell's 8 corners, bit 0 = red, 1 = green, 2 = blue (node = b N^2 + g N + r)."""
    return torch.tensor([((k >> 2) & 1) * size * size + ((k >> 1) & 1) * size + (k & 1) for k in range(8)])


def _trilinear(u: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``u`` ``[n,3]`` (r,g,b in 0..1) -> flat base node of their cell ``[n]`` and corner weights
    ``[n, 8]`` (corner order of ``_corner_offsets``)."""
    p = u.clamp(0, 1) * (size - 1)
    cell = p.floor().clamp(max=size - 2)
    f = p - cell
    c = cell.long()
    base = c[:, 2] * size * size + c[:, 1] * size + c[:, 0]
    wts = []
    for k in range(8):
        wk = torch.ones_like(f[:, 0])
        for axis in range(3):
            wk = wk * (f[:, axis] if (k >> axis) & 1 else 1 - f[:, axis])
        wts.append(wk)
    return base, torch.stack(wts, 1)


# Membrane energy sum |D_axis d|^2 over the three axes of the [C, N(b), N(g), N(r)] lattice (first
# differences): K = sum_axis D^T D is the graph Laplacian of the lattice with free (Neumann) borders.
def _reg_apply(x: torch.Tensor) -> torch.Tensor:
    """``K x`` for ``x`` ``[C, N, N, N]``."""
    out = torch.zeros_like(x)
    n = x.shape[1]
    for dim in (1, 2, 3):
        d = x.diff(dim=dim)
        out.narrow(dim, 0, n - 1).sub_(d)
        out.narrow(dim, 1, n - 1).add_(d)
    return out


def _reg_diag(size: int, dtype) -> torch.Tensor:
    """Diagonal of ``K`` ``[N, N, N]``: the number of lattice neighbours of each node."""
    deg = torch.full((size,), 2.0, dtype=dtype)
    deg[0] = deg[-1] = 1.0
    return deg[:, None, None] + deg[None, :, None] + deg[None, None, :]


@dataclass
class _Data:
    """Sufficient statistics of the data term for one lattice size (accumulated per occupied cell)."""

    size: int
    matrix: torch.Tensor  # [N^3, N^3] sparse CSR: sum of w phi phi^T (normalised by the total weight)
    rhs: torch.Tensor  # [N^3, 3] sum of w phi y (normalised)
    diag: torch.Tensor  # [N^3] diagonal of the data normal matrix


def _accumulate(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, size: int, chunk: int = 1 << 16) -> _Data:
    """Sufficient statistics of the data term for samples ``x``/``y`` ``[n,3]`` (0..1), weights ``w`` ``[n]``."""
    n3 = size ** 3
    offsets = _corner_offsets(size)
    base = torch.cat([_trilinear(x[s:s + chunk], size)[0] for s in range(0, x.shape[0], chunk)])
    cells, inverse = torch.unique(base, return_inverse=True)
    m = cells.numel()
    blocks = torch.zeros(m, 64, dtype=torch.float64)
    rhs = torch.zeros(n3, 3, dtype=torch.float64)
    total = w.sum().double().clamp(min=1e-12)
    for s in range(0, x.shape[0], chunk):
        _, phi = _trilinear(x[s:s + chunk], size)
        phi = phi.double()
        ws = (w[s:s + chunk].double() / total)[:, None]
        blocks.index_add_(0, inverse[s:s + chunk], ((ws * phi)[:, :, None] * phi[:, None, :]).reshape(-1, 64))
        node = base[s:s + chunk, None] + offsets[None]
        contrib = (ws * phi)[:, :, None] * y[s:s + chunk, None, :].double()
        rhs.index_add_(0, node.reshape(-1), contrib.reshape(-1, 3))
    nodes = cells[:, None] + offsets[None]
    blocks = blocks.reshape(m, 8, 8)
    rows = nodes[:, :, None].expand(m, 8, 8).reshape(-1)
    cols = nodes[:, None, :].expand(m, 8, 8).reshape(-1)
    matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), blocks.reshape(-1), (n3, n3),
                                     check_invariants=False).coalesce()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sparse @ dense is all we use
        warnings.simplefilter("ignore", UserWarning)
        matrix = matrix.to_sparse_csr()
    diag = torch.zeros(n3, dtype=torch.float64)
    diag.index_add_(0, nodes.reshape(-1), torch.diagonal(blocks, dim1=1, dim2=2).reshape(-1))
    return _Data(size, matrix, rhs, diag)


def _solve(data: _Data, smoothness: float, init: torch.Tensor, tol: float = CG_TOL,
           max_iters: int = CG_MAX_ITERS, cancel: cancelling.Cancel = None) -> tuple[torch.Tensor, int]:
    """Jacobi-preconditioned CG on ``(Phi^T W Phi + lam K) d = rhs`` for the deviation ``d`` ``[N^3, 3]`` from
    the global affine fit, the three channels at once (each with its own step sizes). Returns (d, iterations)."""
    n = data.size
    lam = smoothness / (n - 1)  # h * sum |D d|^2 ~ integral |grad|^2 (h = 1/(N-1)), see the module docstring

    def matvec(v: torch.Tensor) -> torch.Tensor:
        out = torch.mm(data.matrix, v)
        return out.add_(_reg_apply(v.T.reshape(3, n, n, n)).reshape(3, -1).T, alpha=lam)

    precond = 1.0 / (data.diag + lam * _reg_diag(n, torch.float64).reshape(-1))[:, None]
    x = init.clone()
    r = data.rhs - matvec(x)
    z = precond * r
    p = z.clone()
    rz = (r * z).sum(0)
    limit = tol * data.rhs.norm(dim=0).clamp(min=1e-30)
    it = 0
    while it < max_iters and not bool((r.norm(dim=0) <= limit).all()):
        it += 1
        cancelling.check(cancel)
        ap = matvec(p)
        alpha = rz / (p * ap).sum(0).clamp(min=1e-300)
        x.addcmul_(p, alpha)
        r.addcmul_(ap, alpha, value=-1.0)
        torch.mul(precond, r, out=z)
        rz_new = (r * z).sum(0)
        p.mul_(rz_new / rz.clamp(min=1e-300)).add_(z)
        rz = rz_new
    return x, it


def _upsample_table(flat: torch.Tensor, size_from: int, size_to: int) -> torch.Tensor:
    """Trilinear resampling of a ``[n^3, 3]`` lattice to ``[m^3, 3]`` (exact for affine maps)."""
    vol = flat.T.reshape(1, 3, size_from, size_from, size_from)
    out = F.interpolate(vol, size=(size_to,) * 3, mode="trilinear", align_corners=True)
    return out[0].reshape(3, -1).T.contiguous()


def _affine_fit(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, ridge: float = 1e-8) -> torch.Tensor:
    """Weighted least-squares ``[4, 3]`` matrix with ``y ~ [x, 1] @ M`` (tiny ridge towards the identity)."""
    xa = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    ww = w[:, None]
    total = w.sum().clamp(min=1e-12)
    lhs = (xa * ww).T @ xa / total
    rhs = (xa * ww).T @ y / total
    eye = torch.eye(4, 3, dtype=x.dtype)
    reg = torch.diag(torch.tensor([ridge, ridge, ridge, 0.0], dtype=x.dtype))
    return torch.linalg.solve(lhs + reg + 1e-12 * torch.eye(4, dtype=x.dtype), rhs + reg @ eye)


def fit_lut_samples(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None, size: int = DEFAULT_SIZE,
                    smoothness: float = DEFAULT_SMOOTHNESS, title: str = "",
                    cancel: cancelling.Cancel = None) -> Lut3D:
    """Fit a ``size``-node LUT to color pairs ``x -> y`` (``[n, 3]`` in 0..1) with weights ``w`` ``[n]``.
    ``cancel`` is checked once per level and per conjugate-gradient iteration."""
    size = int(size)
    if not 2 <= size <= MAX_CUBE_SIZE:
        raise InputError(f"LUT size must be 2..{MAX_CUBE_SIZE} (17, 33 or 65 are usual), got {size}")
    if smoothness <= 0:
        raise InputError(f"smoothness must be > 0, got {smoothness}")
    x = x.reshape(-1, 3).double().clamp(0, 1)
    y = y.reshape(-1, 3).double().clamp(0, 1)
    w = torch.ones(x.shape[0], dtype=torch.float64) if w is None else w.reshape(-1).double().clamp(0, 1)
    keep = w > 0
    x, y, w = x[keep], y[keep], w[keep]
    if x.shape[0] == 0:
        raise InputError("no foreground pixel to fit a LUT on: the mask is empty. Expected a mask that "
                         "selects the harmonized object.")
    affine = _affine_fit(x, y, w)
    resid = y - torch.cat([x, torch.ones_like(x[:, :1])], 1) @ affine  # what the lattice has to add
    levels = [s for s in (17, 33) if s < size] + [size]
    dev, iters, prev = None, [], None
    for s in levels:
        cancelling.check(cancel)
        data = _accumulate(x, resid, w, s)
        init = torch.zeros(s ** 3, 3, dtype=torch.float64) if dev is None else _upsample_table(dev, prev, s)
        dev, it = _solve(data, smoothness, init, cancel=cancel)
        iters.append(it)
        prev = s
    ident = identity_table(size).reshape(-1, 3)
    table = torch.cat([ident, torch.ones_like(ident[:, :1])], 1) @ affine + dev
    table = table.reshape(size, size, size, 3)
    lut = Lut3D(table.clamp(0, 1).float(), title=title)
    pred = lookup(x.float(), lut).double()
    rmse = float((((pred - y) ** 2).sum(1) * w).sum() / (3 * w.sum())) ** 0.5
    lut.info = {"samples": int(x.shape[0]), "rmse": rmse, "cg_iterations": iters}
    return lut


def _pairs(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
    """Color pairs inside the mask at the target's resolution: the source (full resolution) and the mask
    are resized to the target's size, as the harmonizer saw them. Returns x, y ``[n,3]`` and weights ``[n]``."""
    source, target, mask = images.composite_result_mask(source, target, mask)
    size = tuple(target.shape[1:3])
    xs, ys, ws = [], [], []
    for i in range(source.shape[0]):
        x = images.resize_images(source[i:i + 1], size)[0]
        m = images.resize_masks(mask[i:i + 1], size)[0]
        if not bool((m >= 0.5).any()):
            continue
        xs.append(x.reshape(-1, 3))
        ys.append(target[i].reshape(-1, 3))
        ws.append(m.reshape(-1))
    if not xs:  # a batch is fitted on the foregrounds it has; none at all is the empty-mask policy's error
        raise InputError("LUT fit: every mask selects no pixel (>= 0.5) at the harmonized size, so there are "
                         "no foreground colors to fit on; expected the pasted object in white on black")
    return torch.cat(xs), torch.cat(ys), torch.cat(ws)


def fit_lut(composite: torch.Tensor, harmonized: torch.Tensor, mask: torch.Tensor, size: int = DEFAULT_SIZE,
            smoothness: float = DEFAULT_SMOOTHNESS, title: str | None = None,
            cancel: cancelling.Cancel = None) -> Lut3D:
    """Fit one global LUT mapping the composite's foreground colors to the harmonized result's.

    ``composite`` IMAGE ``[B,H,W,3]`` (any size), ``harmonized`` IMAGE ``[B,h,w,3]`` (any size: the composite
    and mask are resized to it), ``mask`` MASK. A batch is pooled into one LUT (one look); fit images one by
    one for one LUT each."""
    if int(size) not in LUT_SIZES and not 2 <= int(size) <= MAX_CUBE_SIZE:
        raise InputError(f"LUT size must be one of {LUT_SIZES} (or 2..{MAX_CUBE_SIZE}), got {size}")
    x, y, w = _pairs(composite, harmonized, mask)
    if title is None:
        title = f"ComfyUI-Harmonize {int(size)}^3: composite -> harmonized"
    return fit_lut_samples(x, y, w, size, smoothness, title, cancel)


def fit_lut_sequence(frames: torch.Tensor, mask: torch.Tensor, size: int = DEFAULT_SIZE,
                     smoothness: float = DEFAULT_SMOOTHNESS, cancel: cancelling.Cancel = None) -> list[Lut3D]:
    """One LUT per consecutive pair of ``frames`` (IMAGE ``[T,H,W,3]``, e.g. the per-iteration results of
    the iterative zero-shot harmonizer): LUT ``k`` maps frame ``k``'s foreground colors to frame ``k+1``'s.
    ``mask`` is one MASK for all frames or one per frame (frame ``k``'s mask is used for pair ``k``)."""
    frames = images.image_batch(frames, "frames")
    if frames.shape[0] < 2:
        raise InputError(f"a LUT sequence needs at least 2 frames (a batch of per-iteration images), got "
                         f"{frames.shape[0]}")
    frames, mask = images.image_and_mask(frames, mask)
    luts = []
    for k in range(frames.shape[0] - 1):
        title = f"ComfyUI-Harmonize {int(size)}^3: iteration {k} -> {k + 1}"
        luts.append(fit_lut(frames[k:k + 1], frames[k + 1:k + 2], mask[k:k + 1], size, smoothness, title, cancel))
    return luts


# ---------------------------------------------------------------------------------------- .cube I/O
def _clean_title(title: str) -> str:
    # the title is one quoted string on one line: no quotes or line breaks inside, lines <= 250 characters
    t = " ".join(str(title).replace('"', "'").split())
    return t[:200]


def format_cube(lut: Lut3D) -> str:
    """The ``.cube`` text of ``lut`` (see the module docstring for the format)."""
    lines = ["# Created by ComfyUI-Harmonize"]
    if lut.title:
        lines.append(f'TITLE "{_clean_title(lut.title)}"')
    lines.append(f"LUT_3D_SIZE {lut.size}")
    lines.append("DOMAIN_MIN " + " ".join(f"{v:.6f}" for v in lut.domain_min))
    lines.append("DOMAIN_MAX " + " ".join(f"{v:.6f}" for v in lut.domain_max))
    values = lut.table.detach().reshape(-1, 3).double().tolist()  # [b][g][r] order: red fastest
    lines.extend(f"{r:.6f} {g:.6f} {b:.6f}" for r, g, b in values)
    return "\n".join(lines) + "\n"


def cube_path(folder: str, prefix: str) -> str:
    """``folder/prefix.cube`` for a ComfyUI-style ``filename_prefix`` (may contain sub-folders such as
    ``harmonize/look``); a prefix that is empty, absolute, names no file (``.``, ``a/..``) or leaves
    ``folder`` is an error. Paths are compared after resolving symbolic links, so a link inside the output
    folder that points elsewhere cannot carry the file out of it."""
    prefix = str(prefix).strip().replace("\\", "/")
    if prefix.lower().endswith(".cube"):
        prefix = prefix[:-5]
    expected = "expected a relative name such as 'harmonize/lut'"
    if not prefix or prefix.startswith("/") or os.path.isabs(prefix) or ":" in prefix:
        raise InputError(f"filename_prefix must be a relative name such as 'harmonize/lut', got {prefix!r}")
    if not prefix.split("/")[-1].strip(". "):
        raise InputError(f"filename_prefix {prefix!r} names no file (its last part is empty or only dots); {expected}")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, prefix + ".cube"))
    if os.path.commonpath([root, path]) != root:
        raise InputError(f"filename_prefix {prefix!r} leads out of the output folder {folder} (through '..' or a "
                         f"symbolic link); {expected}")
    return path


def save_lut_sequence(frames: torch.Tensor, mask: torch.Tensor, folder: str, prefix: str,
                      size: int = DEFAULT_SIZE, smoothness: float = DEFAULT_SMOOTHNESS,
                      cancel: cancelling.Cancel = None) -> list[str]:
    """Fit ``fit_lut_sequence`` and write LUT ``k`` to ``folder/prefix_{k:03d}-{k+1:03d}.cube`` (never
    overwriting). Returns the paths written, in order."""
    base = cube_path(folder, prefix)[:-5]  # a bad prefix is refused before any fitting
    luts = fit_lut_sequence(frames, mask, size, smoothness, cancel)
    return [write_cube(lut, f"{base}_{k:03d}-{k + 1:03d}.cube") for k, lut in enumerate(luts)]


def write_cube(lut: Lut3D, path: str) -> str:
    """Write ``lut`` as a ``.cube`` file at ``path``, never overwriting: if a file exists there, the first
    free numbered name (``name_1.cube``, ``name_2.cube``, ...) is used. The file is created exclusively, so a file that
    appears meanwhile is not overwritten either. Returns the path written."""
    if not isinstance(lut, Lut3D):
        raise InputError(f"lut must be a Lut3D (HARMONIZE_LUT), got {type(lut).__name__}")
    if not str(path).lower().endswith(".cube"):
        path = f"{path}.cube"
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    text = format_cube(lut)
    for _ in range(100):
        target = str(image_io.free_path(path))
        try:
            with open(target, "x", encoding="ascii", newline="\n") as fh:
                fh.write(text)
            return target
        except FileExistsError:  # created between the check and the open: take the next name
            continue
    raise InputError(f"could not find a free file name for {path}")


def parse_cube(text: str, source: str = "<text>") -> Lut3D:
    """Parse ``.cube`` text (3D LUTs). Errors name ``source`` and the line."""
    title, size = "", None
    dmin, dmax = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    values: list[list[float]] = []

    def numbers(parts: list[str], count: int, no: int, what: str) -> list[float]:
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) != count or not all(math.isfinite(v) for v in vals):
            raise InputError(f"{source} line {no}: {what} expects {count} numbers, got {' '.join(parts)!r}")
        return vals

    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        head, rest = parts[0], line[len(parts[0]):].strip()
        if head == "TITLE":
            title = rest[1:-1] if len(rest) >= 2 and rest[0] == rest[-1] == '"' else rest
        elif head == "LUT_3D_SIZE":
            try:
                size = int(rest)
            except ValueError:
                raise InputError(f"{source} line {no}: LUT_3D_SIZE expects an integer, got {rest!r}") from None
            if not 2 <= size <= MAX_CUBE_SIZE:
                raise InputError(f"{source} line {no}: LUT_3D_SIZE must be 2..{MAX_CUBE_SIZE}, got {size}")
        elif head in ("LUT_1D_SIZE", "LUT_1D_INPUT_RANGE"):
            raise InputError(f"{source} line {no}: this is a 1D LUT ({head}); expected a 3D LUT (LUT_3D_SIZE)")
        elif head == "DOMAIN_MIN":
            dmin = tuple(numbers(parts[1:], 3, no, head))
        elif head == "DOMAIN_MAX":
            dmax = tuple(numbers(parts[1:], 3, no, head))
        elif head == "LUT_3D_INPUT_RANGE":  # DaVinci Resolve's variant of the domain
            lo, hi = numbers(parts[1:], 2, no, head)
            dmin, dmax = (lo,) * 3, (hi,) * 3
        elif head[0].isdigit() or head[0] in "+-.":
            if size is None:
                raise InputError(f"{source} line {no}: table values before LUT_3D_SIZE")
            values.append(numbers(parts, 3, no, "a table line"))
        else:
            raise InputError(f"{source} line {no}: unknown keyword {head!r}")
    if size is None:
        raise InputError(f"{source}: no LUT_3D_SIZE line; expected a 3D .cube LUT")
    if len(values) != size ** 3:
        raise InputError(f"{source}: LUT_3D_SIZE {size} needs {size ** 3} table lines, found {len(values)}")
    table = torch.tensor(values, dtype=torch.float32).reshape(size, size, size, 3)
    try:
        return Lut3D(table, tuple(dmin), tuple(dmax), title)
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None


def read_cube(path: str) -> Lut3D:
    """Read a 3D ``.cube`` file."""
    if not os.path.isfile(path):
        raise InputError(f"LUT file not found: {path}")
    with open(path, encoding="utf-8", errors="replace") as fh:
        return parse_cube(fh.read(), path)
