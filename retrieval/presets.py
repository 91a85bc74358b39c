"""What a new index is built for (``--preset``) and how its explanations are made by default."""
from __future__ import annotations

PRESETS = {
    # What a new index is built for; every value can be overridden by its own option. Chosen by measurement
    # (bench/results/quality.md): "general" is the best of the cheap settings on faces and categories;
    # "instance" finds the same object photographed elsewhere (R@1 0.14 → 0.88 on the instance set with the
    # global top 60 verified) for about 6.5x the indexing time (448 px input, SIFT keypoints extracted while
    # indexing); on faces and categories it costs a little R@1 (Caltech 0.86 → 0.84). Its searches verify the
    # global top 10 and the visual words' top 30 (ASMK*, retrieval/words.py): on the instance set R@1 0.96,
    # mAP@10 0.898 for ~66 pairs a query, against 0.95 and 0.827 for ~142 with the global top 60 and tf-idf
    # words' top 30 (bench/results/quality.md, "Photo → catalogue"); W 20 misses one more catalogue image in a
    # catalogue-only index (0.94).
    "general": {"input_size": None, "resize": "squash", "pooling": "gap", "head": None, "search": {}},
    "instance": {"input_size": 448, "resize": "long", "pooling": "gem", "head": "pca-whiten:128",
                 "search": {"verify": 10, "words": 30}},
}

# ``--preset faces`` (kept out of PRESETS: it is not a set of backbone options but its own pipeline, indexer/faces.py):
# detect every face (dlib HOG, or its CNN detector), align on 5 landmarks, embed with dlib's face ResNet (the
# PyTorch port, retrieval/dlib_face.py), one row per face; L2 metric, and dlib's documented same-person distance.
FACES = {"model": "dlib_face_resnet", "metric": "l2", "detector": "hog", "upsample": 1, "threshold": 0.6}
