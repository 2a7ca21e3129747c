"""Annotators and dense label-map generation (tools/generate_labels.py, the example demo)."""
from passl.annotate.annotators import (CNNAnnotator, CNNClassifier, LVViTAnnotator, SmallCNN, build_cnn,
                                       build_cnn_annotator, build_lvvit_annotator, load_cnn_weights)
from passl.annotate.generate import generate_label_maps, list_images, preprocess, shard, topk_label_maps

__all__ = ["CNNAnnotator", "CNNClassifier", "LVViTAnnotator", "SmallCNN", "build_cnn", "build_cnn_annotator",
           "build_lvvit_annotator", "load_cnn_weights", "generate_label_maps", "list_images", "preprocess",
           "shard", "topk_label_maps"]
