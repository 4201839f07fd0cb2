"""The experiment spec: schema, loading, overrides, validation."""
from .loader import SpecError, dump_spec, load_spec, spec_from_dict, spec_to_dict
from .schema import ExperimentConfig

__all__ = ["ExperimentConfig", "SpecError", "dump_spec", "load_spec", "spec_from_dict", "spec_to_dict"]
