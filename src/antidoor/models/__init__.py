"""Model registry: CIFAR-style architectures behind a normalising wrapper."""

from antidoor.models import cnn, preact_resnet, resnet, vgg, whitened_cnn  # noqa: F401  (registration)
from antidoor.models.registry import MODELS, Classifier, build_model, frozen_copy

__all__ = ["MODELS", "Classifier", "build_model", "frozen_copy"]
