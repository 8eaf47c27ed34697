"""The MoE transformer: weight pytrees (`weights`), building blocks (`layers`, `moe`), the
per-layer stages and full forward (`transformer`), and the user-facing `Model`."""

from moelens_jax.model.model import Model, TokenError
from moelens_jax.model.weights import HostLayer, LayerLayout, LayerWeights, ModelWeights

__all__ = ["HostLayer", "LayerLayout", "LayerWeights", "Model", "ModelWeights", "TokenError"]
