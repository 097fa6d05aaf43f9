"""metassl: self-supervised contrastive learning with meta-learned and causal regularizers."""
__version__ = "0.1.0"
