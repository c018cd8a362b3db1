//! Checkpoints and the decoder: config, weights, decoder, LoRA, heads.
