"""The release models (installed as ``pneumo_edge.release``); see MODEL_CARD.md."""
