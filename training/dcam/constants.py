"""Constants shared by the backbones and the in-graph normalisation (no imports: a leaf module)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
