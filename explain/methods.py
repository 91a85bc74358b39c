"""Explainers: one interface, three ways of finding the map (SFAM, Grad-CAM on the similarity, occlusion).

Like pytorch-grad-cam's ``BaseCAM``, :class:`Explainer` owns the pipeline (preprocess, forward,
similarity, upsampling to each image's own size, normalisation) and each method overrides one hook,
:meth:`Explainer.raw_maps`, which turns the two images' inputs and feature maps into two raw maps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval.images import own_size
from retrieval.models.backbone import Backbone
from retrieval.models.preprocess import group_by_shape
from retrieval.errors import RetrieveError

from .cis import Decomposition, adds_up, decompose


@dataclass
class Explanation:
    """Why ``result`` matched ``query``: both maps at each image's own size, in [0, 1], plus the raw parts."""

    method: str
    metric: str
    score: float  # cosine similarity, or −squared distance for l2 (higher is better for both)
    query_map: np.ndarray  # float32, H_q × W_q, max-normalised to [0, 1]
    result_map: np.ndarray  # float32, H_r × W_r
    query_raw: np.ndarray  # unnormalised map at feature-map resolution
    result_raw: np.ndarray
    cis: np.ndarray | None = None  # per-channel contributions (SFAM): explain/cis.py
    cis_target: float | None = None  # what Σ CIS equals: the score (cosine), or ½(‖q−μ‖²+‖r−μ‖²−d) for l2
    distance: float | None = None  # l2: squared Euclidean distance
    details: dict = field(default_factory=dict)  # how the map was made (SFAM: layers, tap similarity, gate)
    features: tuple | None = field(default=None, repr=False, compare=False)  # (A_q, A_r) final maps, 1×C×h×w

    @property
    def exact(self) -> bool:
        """The maps' channel terms add up to the score shown: SFAM's CIS of a cosine (not a baseline's map, not l2),
        their sum checked against the score computed by its definition (explain/cis.py)."""
        return self.cis is not None and self.distance is None and self.cis_target is not None \
            and adds_up(self.cis_target, self.score)


MAP_MAX_SIDE = 1024  # maps in memory: long side at most this by default (a 100 MP photo's map would be 400 MB)


def map_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(H, W) of a map for a photo of (H, W) = ``size``: its own size, scaled down so that the long side is
    at most ``max_side`` (None: the photo's own size), aspect kept."""
    h, w = size
    if not max_side or max(h, w) <= max_side:
        return int(h), int(w)
    f = max_side / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def upsample(raw: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a raw map (h×w) to an image's (H, W), then max-normalisation to [0, 1].

    The preprocessing maps the whole image onto the network's input (a square with "squash", the aspect
    kept to within one stride with "long"; nothing is cropped), so the map covers the whole image and
    resizing it to the image's own size undoes the preprocessing exactly.
    """
    t = torch.as_tensor(np.asarray(raw, np.float32))[None, None]
    up = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].clamp_min(0).numpy()
    m = float(up.max())
    return (up / m if m > 0 else up).astype(np.float32)


def _bilinear(n: int, size: int) -> torch.Tensor:
    """The size×n matrix of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis (the same
    source coordinates and weights, computed as torch does, in float32)."""
    scale = n / size
    src = ((torch.arange(size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n - 1)
    i1 = (i0 + 1).clamp_max(n - 1)
    l1 = src - i0
    w = torch.zeros(size, n)
    rows = torch.arange(size)
    w.index_put_((rows, i0), 1 - l1, accumulate=True)
    w.index_put_((rows, i1), l1, accumulate=True)
    return w


def upsample_many(raw: torch.Tensor, size: tuple[int, int]) -> list[np.ndarray]:
    """:func:`upsample` of each of the non-negative maps ``raw`` (N×h×w) to one (H, W), as two matrix
    products (bilinear interpolation is separable): the same maps to float32 rounding, several times faster."""
    h, w = raw.shape[-2:]
    up = torch.matmul(torch.matmul(_bilinear(h, size[0]), raw.float()), _bilinear(w, size[1]).T)
    m = up.amax((1, 2))  # non-negative weights of non-negative maps: nothing to clamp
    up.div_(torch.where(m > 0, m, torch.ones_like(m))[:, None, None])  # an all-zero map stays zero
    return list(up.numpy())


class Explainer:
    """The shared pipeline. ``metric`` is the index's; ``mu`` the collection mean (zeros when unknown).

    ``centre`` (cosine only) computes the CIS on ``q − μ`` and ``r − μ``: the explained similarity is
    then the centred cosine, which localises better at higher resolutions (see bench/results/explain.md).
    """

    name = "base"
    needs_grad = False

    def __init__(self, backbone: Backbone, metric="cosine", mu: np.ndarray | None = None,
                 centre: bool = False, head=None):
        from retrieval.metric import Metric, metric as metric_named

        self._metric = metric if isinstance(metric, Metric) else metric_named(metric)
        self.backbone = backbone
        self.metric = self._metric.name
        self.mu = None if mu is None else np.asarray(mu, np.float64).reshape(-1)
        self.head = head  # retrieval.index.head.LinearHead: e = P(a − m); it centres by itself
        self.centre = centre and mu is not None and self._metric.normalised and head is None
        self.map_max_side: int | None = MAP_MAX_SIDE  # long side of query_map/result_map (None: own size)

    @property
    def space_head(self):
        """The head of the similarity this explainer computes itself: the index's, or centring on μ (``centre``)."""
        if self.head is None and self.centre:
            from retrieval.index.head import LinearHead

            return LinearHead(self.mu)
        return self.head

    # -- the shared pipeline --------------------------------------------------------------------
    def explain(self, query: Image.Image, result: Image.Image, pair: Decomposition | None = None) -> Explanation:
        return self.explain_many(query, [result], pairs=None if pair is None else [pair])[0]

    def explain_many(self, query: Image.Image, results: Sequence[Image.Image],
                     query_features: torch.Tensor | None = None,
                     pairs: Sequence[Decomposition] | None = None) -> list[Explanation]:
        """Explain each (query, result) pair: the backbone runs once on the query, once batched on results.

        ``pairs``: the decompositions of the score the index ranks each pair by (explain/cis.py): the explanations
        then show that score and its CIS, and the maps draw with its channel weights. None: the explainer's own
        similarity at its resolution (no index)."""
        pre = self.backbone.preprocess
        xq = pre.batch([query])
        xr = [pre.batch([r]) for r in results]  # aspect-kept inputs may differ in shape: one tensor each
        aq = ar = None
        if not self.needs_grad:
            aq = query_features if query_features is not None else self.backbone.features(xq)
            ar = [None] * len(xr)
            for idx in group_by_shape([x[0] for x in xr]):
                feats = self.backbone.features(torch.cat([xr[i] for i in idx]))
                for j, i in enumerate(idx):
                    ar[i] = feats[j:j + 1]
        out = []
        for i, res in enumerate(results):
            raw_q, raw_r, info = self.raw_maps(xq, xr[i], aq, None if ar is None else ar[i],
                                               pair=None if pairs is None else pairs[i])
            out.append(Explanation(method=self.name, metric=self.metric, query_map=self._map(raw_q, query),
                                   result_map=self._map(raw_r, res), query_raw=np.asarray(raw_q, np.float32),
                                   result_raw=np.asarray(raw_r, np.float32),
                                   features=None if aq is None else (aq, ar[i]), **info))
        return out

    def _map(self, raw, img: Image.Image) -> np.ndarray:
        return upsample(raw, map_size(own_size(img), self.map_max_side))

    def pool(self, a: torch.Tensor) -> torch.Tensor:
        """The index's pooling (feature map → embedding), differentiable."""
        return self.backbone.pooling.pool(a)

    def decompose(self, q, r) -> list[Decomposition]:
        """The explainer's own similarity of pooled vectors ``q`` (C) and the rows of ``r`` (explain/cis.py): in its
        space (the index's head, or centring on μ), μ the l2 reference point."""
        return decompose(q, r, self._metric, self.space_head, None if self._metric.normalised else self.mu)

    def similarity(self, q, r) -> dict:
        """Score fields for pooled vectors ``q``, ``r`` (numpy), with the CIS and what it sums to."""
        return _pair_info(self.decompose(q, np.atleast_2d(r))[0])

    def torch_similarity(self, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Differentiable similarity of pooled vectors (batch × C), higher is better."""
        head = self.space_head
        if head is not None:
            m = torch.as_tensor(head.mean, dtype=q.dtype, device=q.device)
            q, r = q - m, r - m
            if head.proj is not None:
                p = torch.as_tensor(head.proj, dtype=q.dtype, device=q.device)
                q, r = q @ p.T, r @ p.T
        if self._metric.normalised:
            return F.cosine_similarity(q, r, dim=-1)
        return -((q - r) ** 2).sum(-1)

    def pair_info(self, q, r, pair: Decomposition | None, cis: bool = True) -> dict:
        """The score fields of one pair: the index's decomposition when given, else the explainer's own similarity
        of the pooled vectors ``q``, ``r``; without the CIS (``cis=False``) for a method that does not use it."""
        info = _pair_info(pair if pair is not None else self.decompose(q, np.atleast_2d(r))[0])
        if not cis:
            info["cis"] = info["cis_target"] = None
        return info

    # -- the hook ---------------------------------------------------------------------------------
    def raw_maps(self, xq: torch.Tensor, xr: torch.Tensor, aq: torch.Tensor | None,
                 ar: torch.Tensor | None, pair: Decomposition | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
        raise NotImplementedError


def _pair_info(d: Decomposition) -> dict:
    info = {"score": float(d.score), "cis": d.cis, "cis_target": float(d.total)}
    if d.distance is not None:
        info["distance"] = float(d.distance)
    return info


class SFAMPlain(Explainer):
    """The paper's literal map: ``ReLU(Σ_k CIS_k A_k)`` for each image (the CIS of the pair's score)."""

    name = "sfam-plain"

    def raw_maps(self, xq, xr, aq, ar, pair=None):
        aq, ar = aq.double(), ar.double()
        pooling = self.backbone.pooling
        q, r = pooling.pool(aq)[0].numpy(), pooling.pool(ar)[0].numpy()
        info = self.pair_info(q, r, pair)
        w = torch.as_tensor(info["cis"], dtype=torch.float64)
        # A itself for average pooling; for GeM each location's share of the pooled value (pooling.py)
        mq = torch.relu(torch.einsum("c,chw->hw", w, pooling.contributions(aq)[0])).numpy()
        mr = torch.relu(torch.einsum("c,chw->hw", w, pooling.contributions(ar)[0])).numpy()
        return mq, mr, info


from retrieval.models.registry import TAP_LAYERS  # noqa: E402  (the stride-16 layer per backbone; the indexer samples its μ)


def share_maps(wq: torch.Tensor, wr: torch.Tensor, cq: torch.Tensor, cr: torch.Tensor,
               m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each location's share of a bilinear similarity ``s = Σ_k (q_k − m_k) · u_k`` of pooled vectors.

    ``cq``, ``cr`` (C×h×w): per-channel maps whose spatial mean is the pooled value (the pooling's
    contributions; ``A`` itself for average pooling). ``wr`` are the weights with ``CIS_k = wr_k (r_k − m_k)``
    on the result's side (``wq`` on the query's). Then ``D^r_s = Σ_k wr_k (cr_ks − m_k)``, i.e.
    ``Σ_k CIS_k · M_k`` with ``M_k = (cr_k − m_k) / (r_k − m_k)`` a map whose mean is exactly 1: the CIS
    weights feature maps, and the map's spatial mean is exactly ``Σ_k CIS_k``, the similarity.
    """
    dq = torch.einsum("c,chw->hw", wq, cq - m[:, None, None])
    dr = torch.einsum("c,chw->hw", wr, cr - m[:, None, None])
    return dq, dr


def _unit(fc: torch.Tensor) -> torch.Tensor:
    """Centred local features (…×C×L) → unit vectors along C."""
    return F.normalize(fc, dim=-2)


def _mutual(uq: torch.Tensor, ur: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mutual_gate` on unit features: ``uq`` C×Lq (the query's), ``ur`` N×C×Lr (N results, batched);
    returns (N×Lq, N×Lr). Nearest neighbours as ``torch.max`` finds them (the first of equal maxima), by
    numpy's argmax along contiguous rows (several times faster than a reduction across rows). ``threads``:
    torch's threads for the one large product (None: as set)."""
    with _torch_threads(threads):
        s = torch.matmul(ur.transpose(-1, -2), uq).numpy()  # N × result locations × query locations
    st = np.ascontiguousarray(s.transpose(0, 2, 1))
    nn_r, nn_q = s.argmax(2), st.argmax(2)
    best_r = np.take_along_axis(s, nn_r[..., None], 2)[..., 0]
    best_q = np.take_along_axis(st, nn_q[..., None], 2)[..., 0]
    gr = np.maximum(best_r, 0) * (np.take_along_axis(nn_q, nn_r, 1) == np.arange(s.shape[1]))
    gq = np.maximum(best_q, 0) * (np.take_along_axis(nn_r, nn_q, 1) == np.arange(s.shape[2]))
    return torch.from_numpy(gq), torch.from_numpy(gr)


def mutual_gate(fq: torch.Tensor, fr: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Correspondence gates: for each location of one image, the cosine of its (``m``-centred) local
    feature with its nearest neighbour among the other image's locations, kept only when the two are
    mutual nearest neighbours and the cosine is positive (0 elsewhere). In the features' own precision."""
    m = m.to(fq.dtype)[:, None]
    gq, gr = _mutual(_unit(fq.flatten(1) - m), _unit(fr.flatten(1) - m)[None])
    return gq[0].reshape(fq.shape[-2:]), gr[0].reshape(fr.shape[-2:])


class _torch_threads:
    """torch's intra-op threads set to ``n`` inside the block (restored after). The maps' maths is many small
    operations: on a loaded machine each multi-threaded one waits for a descheduled worker (measured: 0.5 s
    for ten pairs with 2 threads vs 0.15 s with one), while the network (ONNX Runtime's own pool) keeps its.
    The gate's one large product still gets the caller's threads (one wait at most)."""

    def __init__(self, n: int | None):
        self.n = n  # None: leave as set
        self.before = None

    def __enter__(self):
        self.before = torch.get_num_threads()
        if self.n and self.n != self.before:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.before:
            torch.set_num_threads(self.before)
        return False


def _to(m: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a map (h×w, or a batch N×h×w) to ``hw``."""
    if tuple(m.shape[-2:]) == tuple(hw):
        return m
    if m.dim() == 2:
        return F.interpolate(m[None, None], size=hw, mode="bilinear", align_corners=False)[0, 0]
    return F.interpolate(m[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]


def _unit_max(m: torch.Tensor) -> torch.Tensor:
    """Each non-negative map of a batch (N×H×W) divided by its maximum (an all-zero map stays zero)."""
    mx = m.amax((-2, -1), keepdim=True)
    return m / torch.where(mx > 0, mx, torch.ones_like(mx))


PAPER_WEIGHT = 0.5  # λ: the paper's map's floor under the gated product (tuned: bench/results/explain.md)
PAPER_POWER = 4.0  # γ: its sharpening (tuned with λ: the floor orders g's zeros without spreading the mass)
FRAME_SWITCH = 0.5  # the map turns to the whole-frame map when more than half the frame's cells match (not tuned)
FRAME_BLUR = 1.0  # σ of the whole-frame map's smoothing, in cells of the gate's (stride-16) grid: its own scale


def gaussian_blur(m: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of maps (N×H×W) with standard deviation ``sigma`` cells: separable, the kernel
    exp(−x²/2σ²)/Σ on x = −R…R with R = int(4σ + 0.5), edges extended by their own values (as
    ``scipy.ndimage.gaussian_filter(m, sigma, mode="nearest")`` per map). ``sigma`` ≤ 0: ``m`` itself."""
    if sigma <= 0:
        return m
    rad = int(4 * sigma + 0.5)
    x = torch.arange(-rad, rad + 1, dtype=m.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()

    def along(n: int) -> torch.Tensor:  # n×n: row i = Σ_j k_j e_clip(i+j) (edges repeated)
        rows = torch.arange(n).repeat_interleave(2 * rad + 1)
        cols = (torch.arange(n)[:, None] + torch.arange(-rad, rad + 1)[None]).clamp(0, n - 1).reshape(-1)
        b = torch.zeros(n, n, dtype=m.dtype)
        b.index_put_((rows, cols), k.repeat(n), accumulate=True)
        return b

    return torch.matmul(torch.matmul(along(m.shape[-2]), m), along(m.shape[-1]).T)  # two small matrix products


def frame_weight(coverage: torch.Tensor, switch: float) -> torch.Tensor:
    """w = 1 where the match covers most of the frame (κ > ``switch``), else 0 (κ: the gate's coverage)."""
    return (coverage > switch).to(coverage.dtype)


class SFAM(Explainer):
    """The default map, built on SFAM: CIS-weighted feature maps at two depths, kept where the two photos' local features
    correspond, with the paper's map as a floor. The paper's (arXiv:2506.01636) are the CIS and their weighting of the
    feature maps (step 1, and ``P`` in steps 4–5); the stride-16 layer, the gate, the floor and the whole-frame switch
    are retrieve's (:func:`describe_map` says so in every output). Two constants were tuned (λ and γ, step 4); the
    rest follow from the network's grid and the pair.

    For a pair, with ``C`` the final layer's per-channel maps (whose spatial means are the pooled
    embeddings ``q``, ``r``; ``A`` itself for average pooling) and ``m`` the reference point of the
    explained similarity (μ when centred or l2, the head's mean with a head, else 0):

    1. **Final layer (stride 32).** The CIS of the explained similarity, exactly as :class:`SFAMPlain`
       (``Σ_k CIS_k`` = the similarity), weights the channels' centred maps normalised to mean 1:
       ``D32 = Σ_k CIS_k (C_k − m_k)/(r_k − m_k) = Σ_k w_k (C_k − m_k)`` (:func:`share_maps`), whose
       spatial mean is exactly the similarity — each location's share of it.
    2. **Stride-16 layer** (the backbone's ``tap``, the same forward pass): the same map ``D16`` for the cosine of
       that layer's pooled maps, centred on ``mu_tap`` (the collection's mean of those pooled maps at the
       explain resolution; uncentred without it). Its CIS too adds up exactly to its cosine.
    3. **Correspondence gate** ``G16`` (:func:`mutual_gate`): 1 at each stride-16 location whose centred local
       feature and its nearest neighbour in the other image are mutual nearest neighbours with a positive
       cosine, 0 elsewhere. ``g = ReLU(D32↑) · ReLU(D16) · G16 / max``.
    4. **The paper's map as a floor** ``s = λ·(P↑/max P)^γ`` with ``P = ReLU(Σ_k CIS_k C_k)`` (:class:`SFAMPlain`'s
       map, the same CIS), joined to ``g`` by a probabilistic OR: ``map = g + s·(1 − g)``. ``s ≤ λ < 1`` keeps
       ``g``'s maximum the map's maximum (pointing is ``g``'s); ``s`` orders the locations ``g`` leaves at 0 (≈ 85 %
       on real pairs), which deletion/insertion would otherwise take at random. The two tuned constants,
       λ = ``PAPER_WEIGHT`` = 0.5 and γ = ``PAPER_POWER`` = 4, trade the floor's mass (energy-in-box on composites)
       against its order (insertion on real pairs): measured on the tuning part of bench/results/explain.md, a
       lighter or sharper floor (λ 0.25, or γ 8) gains set C energy and loses Caltech insertion, a flatter one
       (γ 1–2) the reverse.
    5. **The whole frame.** With κ the share of that side's stride-16 cells that ``G16`` keeps: when κ > ½
       (``FRAME_SWITCH``: most of the frame has a counterpart in the other photo) there is no region to single
       out — ``g``'s peaks pick a few cells among many that match as well — and the map is the score's own spread
       instead, the paper's map smoothed to the scale at which the gate decides (Gaussian, σ = one cell of its
       grid, ``FRAME_BLUR``): ``map = blur(P↑)/max``. Pasted regions cover at most 28 % of a composite's cells,
       two photos of one face 27–84 % (median 62 %). ``frame=None``: no switch.

    ``↑``: bilinear upsampling of the final map to the stride-16 grid (14×14 → 28×28 at 448 px). ``paper=0``:
    ``g`` alone; ``gate=False``: no gate. Backbones without a stride-16 layer get ``g = ReLU(D32)``.
    ``cis``/``cis_target`` are the final layer's, exact as before.

    Cost: :meth:`explain_many` computes the query's quantities once, and each batch of results (one per
    input shape) together: D32 and D16 as float64 matrix products, the gate as one float32 product of the
    unit local features (the backbone's own precision), the maps upsampled in batches.
    """

    name = "sfam"

    def __init__(self, *args, mu_tap: np.ndarray | None = None, tap: str | None = "auto", gate: bool = True,
                 paper: float = PAPER_WEIGHT, paper_power: float = PAPER_POWER, frame: float | None = FRAME_SWITCH,
                 frame_blur: float = FRAME_BLUR, **kw):
        super().__init__(*args, **kw)
        self.frame = None if frame is None else float(frame)  # κ above which the map is the whole-frame map
        self.frame_blur = float(frame_blur)
        self.paper = float(paper)  # λ: the weight of the paper's map under the gated product (0: none)
        self.paper_power = float(paper_power)  # γ: the paper's map (max-normalised) enters raised to this power
        self.mu_tap = None if mu_tap is None else np.asarray(mu_tap, np.float64).reshape(-1)
        self.tap = self.backbone.tap if tap == "auto" else tap
        self.gate = gate

    def explain_many(self, query, results, query_features=None, pairs=None):
        if not results:
            return []
        pre = self.backbone.preprocess
        arrays = [pre.array(r) for r in results]  # each image preprocessed once, batched by input shape
        xq = torch.from_numpy(pre.array(query)[None])
        if self.tap is not None:
            fq = self.backbone.features_and_tap(xq, self.tap)
        else:
            fq = (query_features if query_features is not None else self.backbone.features(xq), None)
        batches = []  # all forward passes first, then the maths (no torch thread pool busy beside the network's)
        for idx in group_by_shape(arrays):
            x = torch.from_numpy(np.stack([arrays[i] for i in idx]))
            fr = (self.backbone.features_and_tap(x, self.tap) if self.tap is not None
                  else (self.backbone.features(x), None))
            batches.append((idx, fr))
        threads = torch.get_num_threads()
        with _torch_threads(1):
            side = self._query_side(*fq, pairs=pairs)
            raws: list = [None] * len(results)
            for idx, fr in batches:
                mq, mr, infos = self._maps_batch(side, *fr, threads=threads,
                                                 pairs=None if pairs is None else [pairs[i] for i in idx])
                for j, i in enumerate(idx):
                    raws[i] = (mq[j], mr[j], infos[j], fr[0][j:j + 1])
            qmaps = upsample_many(torch.from_numpy(np.stack([r[0] for r in raws])),
                                  map_size(own_size(query), self.map_max_side))
            rmaps: list = [None] * len(results)  # batched by (raw shape, map size)
            groups: dict = {}
            for i, r in enumerate(results):
                groups.setdefault((raws[i][1].shape, map_size(own_size(r), self.map_max_side)), []).append(i)
            for (_, size), idx in groups.items():
                for i, m in zip(idx, upsample_many(torch.from_numpy(np.stack([raws[i][1] for i in idx])), size)):
                    rmaps[i] = m
        out = []
        for i, res in enumerate(results):
            raw_q, raw_r, info, ar = raws[i]
            out.append(Explanation(method=self.name, metric=self.metric, query_map=qmaps[i],
                                   result_map=rmaps[i], query_raw=np.asarray(raw_q, np.float32),
                                   result_raw=np.asarray(raw_r, np.float32),
                                   features=(fq[0], ar), **info))
        return out

    def _ref(self, dim: int, pairs=None) -> np.ndarray:
        """``m``, the point the maps' channels are centred on: with the index's pairs, the collection's mean at the
        explain resolution (μ) when known, else their space's centre; for the explainer's own similarity its
        reference point (see the class docstring)."""
        if pairs:
            return self.mu if self.mu is not None else np.asarray(pairs[0].centre, np.float64)
        if self.head is not None:
            return np.asarray(self.head.mean, np.float64)
        if self.centre or (self.metric == "l2" and self.mu is not None):
            return self.mu
        return np.zeros(dim)

    def _weights(self, q: np.ndarray, r: np.ndarray, pairs=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(wq, wr, m): the channel weights of the query's and the result's maps (explain/cis.py: the spatial mean of
        Σ_k wr_k (C_k − m_k) is the explained similarity), from the index's ``pairs`` or the explainer's own
        similarity. ``r`` may be N×C (N results against one query): then wq, wr are N×C."""
        one = np.ndim(r) == 1
        ds = pairs if pairs else self.decompose(q, np.atleast_2d(r))
        wq, wr = np.stack([d.wq for d in ds]), np.stack([d.wr for d in ds])
        m = self._ref(np.shape(q)[-1], pairs)
        return (wq[0], wr[0], m) if one else (wq, wr, m)

    def _query_side(self, aq: torch.Tensor, tq: torch.Tensor | None, pairs=None) -> dict:
        """What a query contributes to every pair, computed once: its pooled vector, its centred
        contributions (C×h·w), and at the tap its centred pooled vector, centred maps and unit features."""
        a = aq.double()
        pooling = self.backbone.pooling
        q = pooling.pool(a)[0].numpy()
        m = torch.from_numpy(np.array(self._ref(q.shape[0], pairs), dtype=np.float64))  # a copy: the ref may be read-only
        side = {"q": q, "m": m, "hw": tuple(a.shape[-2:]),
                "cq": (pooling.contributions(a)[0] - m[:, None, None]).flatten(1)}
        if tq is not None:
            t = tq[0]
            mt = (torch.as_tensor(self.mu_tap, dtype=torch.float64) if self.mu_tap is not None
                  else torch.zeros(t.shape[0], dtype=torch.float64))
            tc = t.double().flatten(1) - mt[:, None]
            side.update(mt=mt, thw=tuple(t.shape[-2:]), tc=tc, q16=tc.mean(1),
                        uq=_unit(tc.to(t.dtype)) if self.gate else None)
        return side

    def _maps_batch(self, side: dict, ar: torch.Tensor, tr: torch.Tensor | None,
                    threads: int | None = None, pairs=None) -> tuple[list, list, list]:
        """Raw maps (query's, result's; numpy float64) and info for N results (``ar`` N×C×h×w, ``tr`` N×C'×H×W
        or None) against the query of ``side``; ``threads``: torch's threads for the gate's product; ``pairs``: the
        index's decompositions of the N pairs' scores (None: the explainer's own similarity)."""
        n = ar.shape[0]
        a = ar.double()
        pooling = self.backbone.pooling
        r = pooling.pool(a).numpy()
        q, m = side["q"], side["m"]
        infos = [self.pair_info(q, r[i], None if pairs is None else pairs[i]) for i in range(n)]
        mq, mr, infos = self._gated_batch(side, a, tr, r, infos, threads, pairs)
        if self.paper > 0:
            # the paper's map with the same CIS, ReLU(Σ_k CIS_k C_k), on the final grid, upsampled to the map's
            cis = torch.from_numpy(np.stack([info["cis"] for info in infos]))  # N×C
            cr = pooling.contributions(a).flatten(2)
            h, w = side["hw"]
            pq = torch.relu(cis @ (side["cq"] + m[:, None])).reshape(n, h, w)
            pr = torch.relu(torch.bmm(cis[:, None], cr)[:, 0]).reshape(n, *a.shape[-2:])
            lam, gamma = self.paper, self.paper_power
            g_q, g_r = _unit_max(mq), _unit_max(mr)
            s_q = lam * _unit_max(_to(pq, tuple(mq.shape[-2:]))) ** gamma
            s_r = lam * _unit_max(_to(pr, tuple(mr.shape[-2:]))) ** gamma
            power = f"^{gamma:g}" if gamma != 1 else ""
            mq, mr = g_q + s_q * (1 - g_q), g_r + s_r * (1 - g_r)  # 1 − (1 − g)(1 − s): g's peaks stay the peaks
            for info in infos:
                info["details"]["map"] = (f"g ⊕ s = g + s·(1 − g), g = {info['details']['map']}/max, "
                                          f"s = {lam:g}·(SFAM_paper↑/max){power}")
            if self.frame is not None and "gate_coverage" in infos[0]["details"]:
                # a match that covers most of the frame: the paper's map, smoothed, instead (w = 1)
                cov = torch.tensor([info["details"]["gate_coverage"] for info in infos], dtype=mq.dtype)  # N×2
                w_q, w_r = frame_weight(cov[:, 0], self.frame), frame_weight(cov[:, 1], self.frame)
                mq, mr = self._turn(mq, pq, w_q), self._turn(mr, pr, w_r)
                for i, info in enumerate(infos):
                    info["details"]["frame_weight"] = [float(w_q[i]), float(w_r[i])]
                    info["details"]["map"] = (f"(1 − w)·({info['details']['map']}) + w·blur(SFAM_paper↑)/max, "
                                              f"w = [κ > {self.frame:g}], κ = G16's coverage")
        return list(mq.clamp_min(0).numpy()), list(mr.clamp_min(0).numpy()), infos

    def _turn(self, m: torch.Tensor, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One side's maps ``m`` (N×H×W), replaced where ``w`` (N, 0 or 1) is 1 by its paper's maps ``p``, smoothed:
        step 5."""
        if not bool((w > 0).any()):
            return m
        f = _unit_max(gaussian_blur(_to(p, tuple(m.shape[-2:])), self.frame_blur))
        return (1 - w)[:, None, None] * m + w[:, None, None] * f

    def _gated_batch(self, side: dict, a: torch.Tensor, tr: torch.Tensor | None, r: np.ndarray, infos: list,
                     threads: int | None, pairs=None) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The gated product (N×H×W each side, before the paper's map is added) for :meth:`_maps_batch`."""
        n = a.shape[0]
        pooling = self.backbone.pooling
        q, m = side["q"], side["m"]
        wq, wr, _ = self._weights(q, r, pairs)
        wq, wr = torch.from_numpy(np.ascontiguousarray(wq)), torch.from_numpy(np.ascontiguousarray(wr))
        cr = pooling.contributions(a).flatten(2)  # N×C×h·w; Σ_k wr_k (cr_k − m_k) = Σ_k wr_k cr_k − wr·m
        h, w = side["hw"]
        dq = torch.relu(wq @ side["cq"]).reshape(n, h, w)
        dr = torch.relu(torch.bmm(wr[:, None], cr)[:, 0] - (wr @ m)[:, None]).reshape(n, *a.shape[-2:])
        details = {"map": "ReLU(D32)", "layers": ["final"]}
        if tr is None:
            for info in infos:
                info["details"] = dict(details)
            return dq, dr, infos
        mt, tcq, q16 = side["mt"], side["tc"], side["q16"]
        tc = tr.double().flatten(2) - mt[None, :, None]  # N×C'×L
        r16 = tc.mean(2)
        z = (q16.norm() * r16.norm(dim=1)).clamp_min(1e-12)
        eq = torch.relu((r16 / z[:, None]) @ tcq).reshape(n, *side["thw"])
        er = torch.relu(torch.einsum("c,ncl->nl", q16, tc) / z[:, None]).reshape(n, *tr.shape[-2:])
        dq = _to(dq, side["thw"]) * eq
        dr = _to(dr, tuple(tr.shape[-2:])) * er
        sims = (r16 @ q16) / z
        base = {"map": "ReLU(D32↑)·ReLU(D16)", "layers": ["final", self.tap], "tap_centred": self.mu_tap is not None}
        cov = None
        if self.gate:
            gq, gr = _mutual(side["uq"], _unit(tc.to(tr.dtype)), threads)
            # κ: the share of each side's stride-16 cells with a mutual match (how much of the frame matches)
            cov = torch.stack([(gq > 0).double().mean(1), (gr > 0).double().mean(1)], 1)  # N×2 (query, result)
            gq, gr = (gq > 0).to(dq.dtype), (gr > 0).to(dr.dtype)
            dq, dr = dq * gq.reshape(dq.shape), dr * gr.reshape(dr.shape)
            base["map"] += "·G16"
        for i, info in enumerate(infos):
            info["details"] = {"map": base["map"], "layers": list(base["layers"]), "tap_similarity": float(sims[i]),
                               "tap_centred": base["tap_centred"]}
            if cov is not None:
                info["details"]["gate_coverage"] = [float(cov[i, 0]), float(cov[i, 1])]
        return dq, dr, infos

    def raw_maps(self, xq, xr, aq, ar, pair=None):
        tq = tr = None
        if isinstance(aq, tuple):
            (aq, tq), (ar, tr) = aq, ar
        pairs = None if pair is None else [pair]
        mq, mr, infos = self._maps_batch(self._query_side(aq, tq, pairs), ar, tr, pairs=pairs)
        return mq[0], mr[0], infos[0]


class GradCAM(Explainer):
    """Grad-CAM on the similarity: channel weights = spatial mean of d(similarity)/dA, map = ReLU(Σ w_k A_k)."""

    name = "gradcam"
    needs_grad = True

    def raw_maps(self, xq, xr, aq, ar, pair=None):
        with torch.enable_grad():
            aq = self.backbone.eager_features(xq).detach().requires_grad_(True)
            ar = self.backbone.eager_features(xr).detach().requires_grad_(True)
            s = self.torch_similarity(self.pool(aq), self.pool(ar)).sum()
            gq, gr = torch.autograd.grad(s, [aq, ar])
        maps = []
        for a, g in ((aq, gq), (ar, gr)):
            w = g[0].mean((1, 2))
            maps.append(torch.relu(torch.einsum("c,chw->hw", w, a[0])).detach().cpu().double().numpy())
        info = self.pair_info(self.pool(aq.detach())[0].cpu().double().numpy(),
                              self.pool(ar.detach())[0].cpu().double().numpy(), pair, cis=False)
        return maps[0], maps[1], info


class Occlusion(Explainer):
    """Slide a grey patch over each image; the map is the drop in similarity where the patch sat."""

    name = "occlusion"

    def __init__(self, *args, patch_fraction: float = 1 / 7, stride_fraction: float = 1 / 14, **kw):
        super().__init__(*args, **kw)
        self.patch_fraction = patch_fraction
        self.stride_fraction = stride_fraction

    def _occluded(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]], int]:
        h, w = x.shape[-2:]
        s = max(h, w)
        p = max(1, round(s * self.patch_fraction))
        st = max(1, round(s * self.stride_fraction))
        pre = self.backbone.preprocess  # grey = mid-grey (0.5) in the network's normalised input
        grey = ((torch.tensor([0.5, 0.5, 0.5]) - torch.tensor(pre.mean)) / torch.tensor(pre.std)).view(3, 1, 1)

        def starts(n: int) -> list[int]:
            out = list(range(0, max(n - p, 0) + 1, st))
            return out if out[-1] == max(n - p, 0) else out + [max(n - p, 0)]

        positions = [(y, xx) for y in starts(h) for xx in starts(w)]
        batch = x.repeat(len(positions), 1, 1, 1)
        for i, (y, xx) in enumerate(positions):
            batch[i, :, y:y + p, xx:xx + p] = grey
        return batch, positions, p

    def _drop_map(self, x: torch.Tensor, other: torch.Tensor, base: float) -> np.ndarray:
        batch, positions, p = self._occluded(x)
        pooled = torch.cat([self.pool(self.backbone.features(batch[i:i + 32])) for i in range(0, len(batch), 32)])
        sims = self.torch_similarity(pooled.double(), other.double().expand_as(pooled)).numpy()
        acc = np.zeros(tuple(x.shape[-2:]))
        cnt = np.zeros(tuple(x.shape[-2:]))
        for (y, xx), v in zip(positions, sims):
            acc[y:y + p, xx:xx + p] += base - v
            cnt[y:y + p, xx:xx + p] += 1
        return np.maximum(acc / np.maximum(cnt, 1), 0)

    def raw_maps(self, xq, xr, aq, ar, pair=None):
        q, r = self.pool(aq), self.pool(ar)
        base = float(self.torch_similarity(q.double(), r.double())[0])
        info = self.pair_info(q[0].double().numpy(), r[0].double().numpy(), pair, cis=False)
        return self._drop_map(xq, r, base), self._drop_map(xr, q, base), info


METHODS: dict[str, type[Explainer]] = {"sfam": SFAM, "sfam-plain": SFAMPlain, "gradcam": GradCAM,
                                       "occlusion": Occlusion}

# What each method's map is, in words: the short label (the PNG, the web app's method switch) and the description
# (explain.json's ``explained.map``, the report's caption, the web pair page). Only SFAM's maps are built on a
# decomposition of the score; the baselines are saliencies of it.
MAP_LABELS = {"sfam": "default (built on SFAM)", "sfam-plain": "SFAM, the paper's map",
              "gradcam": "Grad-CAM, a gradient saliency (baseline)", "occlusion": "occlusion saliency (baseline)"}
PAPER = "SFAM (Similar Feature Activation Maps, arXiv:2506.01636)"


def describe_map(e: Explanation) -> str:
    """What ``e``'s heat maps are: which parts are the paper's and what retrieve adds (for the default map, read off
    how this map was made: ``e.details``), or what a baseline measures."""
    scaled = " Each map is scaled to its own maximum."
    if e.method == "sfam-plain":
        return (f"The paper's map, {PAPER}: each photo's feature maps weighted by the score's channel terms (CIS), "
                "negative values cut; nothing added." + scaled)
    if e.method == "gradcam":
        return ("Grad-CAM (a baseline): each photo's feature maps weighted by the score's average gradient: a gradient "
                "saliency of the score (where it is sensitive), not a decomposition of it." + scaled)
    if e.method == "occlusion":
        return ("Occlusion (a baseline): how much the score drops when a grey patch hides each place of a photo: an "
                "occlusion saliency of the score, not a decomposition of it." + scaled)
    if e.method != "sfam":
        return f"The {e.method} map." + scaled
    form = str(e.details.get("map", ""))
    added = []
    if "D16" in form:
        added.append("the same weighting on a finer layer of the network")
    if "G16" in form:
        added.append("a gate that keeps the regions whose local features match between the two photos")
    if "SFAM_paper" in form:
        added.append("the paper's map as a faint floor")
    if "frame_weight" in e.details:
        added.append("a switch to the paper's map, smoothed, where the match covers most of the frame")
    adds = ("; ".join(added) if added else "nothing on this network (no finer layer known): the weighting centred on "
            "the collection's average")
    return (f"The default map (sfam), built on {PAPER}. The paper's part: the score's channel terms (CIS) weight "
            f"each photo's own feature maps. What retrieve adds: {adds}." + scaled)


def make_explainer(method: str, backbone: Backbone, metric="cosine", mu: np.ndarray | None = None,
                   centre: bool = False, head=None, mu_tap: np.ndarray | None = None) -> Explainer:
    """``mu_tap``: the collection's mean of the stride-16 layer's pooled maps at the explain resolution
    (SFAM's default map centres that layer with it; see :class:`SFAM`)."""
    try:
        cls = METHODS[method]
    except KeyError:
        raise RetrieveError(f"unknown method {method!r} (one of {', '.join(METHODS)})") from None
    if cls is SFAM:
        return cls(backbone, metric=metric, mu=mu, centre=centre, head=head, mu_tap=mu_tap)
    return cls(backbone, metric=metric, mu=mu, centre=centre, head=head)
