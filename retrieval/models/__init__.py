"""The networks: backbones, their preprocessing and pooling, and the paths that run them."""
