//! Weight quantization (bitsandbytes-exact NF4).
