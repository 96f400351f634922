"""DeepSpeed ZeRO learner ranks, multimodal batching and weight sync."""
