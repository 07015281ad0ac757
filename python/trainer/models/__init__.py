"""Model zoo: registry, architectures, pretrained loading."""
from .pretrained import LoadReport, WeightsMismatchError, load_pretrained, set_backbone_trainable
from .registry import (ModelSpec, count_parameters, create_model, get_head, get_spec, head_prefix,
                       list_models, num_features, penultimate, register_model, replace_head)
from .weights import (NamedWeights, WeightsError, WeightsUnavailableError, is_weights_name,
                      preprocessing_defaults, resolve_weights)
from .zoo import register_all

register_all()

__all__ = [
    "LoadReport", "ModelSpec", "NamedWeights", "WeightsError", "WeightsMismatchError", "WeightsUnavailableError",
    "is_weights_name", "preprocessing_defaults", "resolve_weights", "count_parameters", "create_model", "get_head",
    "get_spec", "head_prefix", "list_models", "load_pretrained", "num_features", "penultimate",
    "register_model", "replace_head", "set_backbone_trainable",
]
