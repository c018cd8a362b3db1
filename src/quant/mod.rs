//! Weight quantization (bitsandbytes-exact NF4).

pub mod nf4;
