//! Transformers: torchvision's ViT, open_clip's CLIP (ViT-B-32 style) and Hugging Face's
//! GPT-2. All share one pre-norm block with fused scaled-dot-product attention.

use super::{Settings, ZooError, limits, value_err};
use crate::graph::Graph;
use crate::graph::{Builder, DType, GraphError, Init, InputKind, Op, Task};

/// Module names of one reference's block, so that error messages point at the module the
/// reference calls that way.
struct Names {
    ln_1: &'static str,
    qkv: &'static str,
    proj: &'static str,
    ln_2: &'static str,
    fc: &'static str,
    fc_out: &'static str,
    /// Hugging Face's `Conv1D` stores weights as `[in, out]`.
    weight_in_out: bool,
}

const TORCH_NAMES: Names = Names {
    ln_1: "ln_1",
    qkv: "self_attention.in_proj",
    proj: "self_attention.out_proj",
    ln_2: "ln_2",
    fc: "mlp.0",
    fc_out: "mlp.3",
    weight_in_out: false,
};
const CLIP_NAMES: Names = Names {
    ln_1: "ln_1",
    qkv: "attn.in_proj",
    proj: "attn.out_proj",
    ln_2: "ln_2",
    fc: "mlp.c_fc",
    fc_out: "mlp.c_proj",
    weight_in_out: false,
};
const GPT2_NAMES: Names = Names {
    ln_1: "ln_1",
    qkv: "attn.c_attn",
    proj: "attn.c_proj",
    ln_2: "ln_2",
    fc: "mlp.c_fc",
    fc_out: "mlp.c_proj",
    weight_in_out: true,
};

struct BlockCfg {
    heads: u64,
    mlp: u64,
    eps: f64,
    causal: bool,
    attn_dropout: f64,
    /// Dropout after the attention projection and after the MLP.
    resid_dropout: f64,
    /// torchvision's MLP block also drops out after the GELU.
    mlp_mid_dropout: bool,
    gelu_tanh: bool,
}

/// One pre-norm block: `x + proj(attn(ln_1(x)))`, then `x + mlp(ln_2(x))`.
fn block(b: &mut Builder, x: usize, n: &Names, cfg: &BlockCfg) -> Result<usize, GraphError> {
    let s = b.shape(x).to_vec();
    let (batch, seq, dim) = (s[0], s[1], s[2]);
    let hd = dim / cfg.heads;
    let h = b.layer_norm(n.ln_1, x, cfg.eps)?;
    let qkv = b.linear_with(n.qkv, h, 3 * dim, true, n.weight_in_out)?;
    let qkv = b.view(qkv, vec![batch, seq, 3, cfg.heads, hd])?;
    // [3, B, H, N, hd]: one copy, then q, k and v are contiguous slices of it.
    let qkv = b.permute_copy(qkv, vec![2, 0, 3, 1, 4])?;
    let (q, k, v) = (b.select(qkv, 0, 0), b.select(qkv, 0, 1), b.select(qkv, 0, 2));
    let a = b.attention(q, k, v, cfg.causal, cfg.attn_dropout)?;
    let a = b.permute_copy(a, vec![0, 2, 1, 3])?;
    let a = b.view(a, vec![batch, seq, dim])?;
    let a = b.linear_with(n.proj, a, dim, true, n.weight_in_out)?;
    let a = b.dropout(a, cfg.resid_dropout);
    let x = b.add(x, a)?;
    let h = b.layer_norm(n.ln_2, x, cfg.eps)?;
    let h = b.linear_with(n.fc, h, cfg.mlp, true, n.weight_in_out)?;
    let h = b.unary(Op::Gelu { tanh: cfg.gelu_tanh }, h);
    let h = if cfg.mlp_mid_dropout { b.dropout(h, cfg.resid_dropout) } else { h };
    let h = b.linear_with(n.fc_out, h, dim, true, n.weight_in_out)?;
    let h = b.dropout(h, cfg.resid_dropout);
    b.add(x, h)
}

fn heads_divide(key: &str, width: u64, heads: u64) -> Result<(), ZooError> {
    if width % heads != 0 {
        return Err(value_err(key, format!("{heads} heads must divide the width {width}")));
    }
    // Flash and memory-efficient attention need a head dimension that is a multiple of 8;
    // PyTorch would silently fall back to materialising every attention matrix.
    if (width / heads) % 8 != 0 {
        return Err(value_err(
            key,
            format!(
                "the head dimension {width}/{heads} = {} must be a multiple of 8 (fused attention kernels need it)",
                width / heads
            ),
        ));
    }
    Ok(())
}

fn patches(image: &[u64], patch: u64) -> Result<u64, ZooError> {
    if image.iter().any(|&d| d % patch != 0) {
        return Err(value_err("image", format!("each side must be divisible by patch_size {patch}, got {image:?}")));
    }
    Ok(image.iter().map(|d| d / patch).product())
}

/// A patch embedding: `[B, C, H, W]` -> `[B, N, D]` (conv, flatten, transpose).
fn patchify(b: &mut Builder, x: usize, name: &str, dim: u64, patch: u64, bias: bool) -> Result<usize, GraphError> {
    let p = b.conv(name, x, dim, patch, patch, 0, 1, bias)?;
    let s = b.shape(p).to_vec();
    let flat = b.view(p, vec![s[0], s[1], s[2] * s[3]])?;
    b.permute(flat, vec![0, 2, 1])
}

pub fn vit(s: &Settings, batch: u64) -> Result<Graph, ZooError> {
    let image = s.sizes("image", 224, 2, limits::MAX_IMAGE)?;
    let patch = s.u64("patch_size", 16, 1, limits::MAX_IMAGE)?;
    let layers = s.u64("num_layers", 12, 1, limits::MAX_DEPTH)?;
    let heads = s.u64("num_heads", 12, 1, limits::MAX_WIDTH)?;
    let dim = s.u64("hidden_dim", 768, 1, limits::MAX_WIDTH)?;
    let mlp = s.u64("mlp_dim", 3072, 1, limits::MAX_WIDTH * 4)?;
    let classes = s.u64("num_classes", 1000, 2, limits::MAX_CLASSES)?;
    let dropout = s.f64("dropout", 0.0, 0.0, 0.99)?;
    let attention_dropout = s.f64("attention_dropout", 0.0, 0.0, 0.99)?;
    heads_divide("num_heads", dim, heads)?;
    let n = patches(&image, patch)?;
    let mut b = Builder::new(Task::Classify { classes });
    let x = b.input(vec![batch, 3, image[0], image[1]], InputKind::Real);
    let tokens = patchify(&mut b, x, "conv_proj", dim, patch, true)?;
    let cls = b.param("class_token", vec![1, 1, dim], Init::Const(0.0));
    let mut h = b.prepend_token(tokens, cls)?;
    let cfg = BlockCfg {
        heads,
        mlp,
        eps: 1e-6,
        causal: false,
        attn_dropout: attention_dropout,
        resid_dropout: dropout,
        mlp_mid_dropout: true,
        gelu_tanh: false,
    };
    h = b.scope("encoder", |b| -> Result<usize, GraphError> {
        let pos = b.param("pos_embedding", vec![1, n + 1, dim], Init::Normal(0.02));
        let mut h = b.add_param(h, pos)?;
        h = b.dropout(h, dropout);
        for i in 0..layers {
            h = b.block(|b| b.scope(format!("layers.encoder_layer_{i}"), |b| block(b, h, &TORCH_NAMES, &cfg)))?;
        }
        b.layer_norm("ln", h, 1e-6)
    })?;
    let first = b.select(h, 1, 0);
    let out = b.linear("heads.head", first, classes, true)?;
    Ok(b.finish(vec![out]))
}

pub fn gpt2(s: &Settings, batch: u64) -> Result<Graph, ZooError> {
    let n_layer = s.u64("n_layer", 12, 1, limits::MAX_DEPTH)?;
    let n_embd = s.u64("n_embd", 768, 1, limits::MAX_WIDTH)?;
    let n_head = s.u64("n_head", 12, 1, limits::MAX_WIDTH)?;
    let n_positions = s.u64("n_positions", 1024, 1, limits::MAX_SEQ)?;
    let vocab = s.u64("vocab_size", 50257, 2, limits::MAX_VOCAB)?;
    let seq = s.u64("seq", n_positions, 1, limits::MAX_SEQ)?;
    let resid = s.f64("resid_pdrop", 0.1, 0.0, 0.99)?;
    let embd = s.f64("embd_pdrop", 0.1, 0.0, 0.99)?;
    let attn = s.f64("attn_pdrop", 0.1, 0.0, 0.99)?;
    heads_divide("n_head", n_embd, n_head)?;
    if seq > n_positions {
        return Err(value_err("seq", format!("{seq} tokens exceed n_positions {n_positions}")));
    }
    let mut b = Builder::new(Task::LanguageModel { vocab });
    let ids = b.input(vec![batch, seq], InputKind::Tokens { vocab });
    let (h, wte) = b.scope("transformer", |b| -> Result<(usize, usize), GraphError> {
        let wte = b.scope("wte", |b| b.param("weight", vec![vocab, n_embd], Init::Normal(0.02)));
        let tok = b.embedding_with(ids, wte);
        let wpe = b.scope("wpe", |b| b.param("weight", vec![n_positions, n_embd], Init::Normal(0.01)));
        let positions = b.buffer("position_ids", vec![seq], DType::I64, Init::Arange);
        let pos = b.gather(wpe, positions);
        let mut h = b.add(tok, pos)?;
        h = b.dropout(h, embd);
        let cfg = BlockCfg {
            heads: n_head,
            mlp: 4 * n_embd,
            eps: 1e-5,
            causal: true,
            attn_dropout: attn,
            resid_dropout: resid,
            mlp_mid_dropout: false,
            gelu_tanh: true,
        };
        for i in 0..n_layer {
            h = b.block(|b| b.scope(format!("h.{i}"), |b| block(b, h, &GPT2_NAMES, &cfg)))?;
        }
        Ok((b.layer_norm("ln_f", h, 1e-5)?, wte))
    })?;
    let logits = b.linear_tied(h, wte)?;
    Ok(b.finish(vec![logits]))
}

pub fn clip(s: &Settings, batch: u64) -> Result<Graph, ZooError> {
    let embed = s.u64("embed_dim", 512, 1, limits::MAX_WIDTH)?;
    let image = s.sizes("image", 224, 2, limits::MAX_IMAGE)?;
    let patch = s.u64("patch_size", 32, 1, limits::MAX_IMAGE)?;
    let v_layers = s.u64("vision_layers", 12, 1, limits::MAX_DEPTH)?;
    let v_width = s.u64("vision_width", 768, 64, limits::MAX_WIDTH)?;
    let seq = s.u64("seq", 77, 1, limits::MAX_SEQ)?;
    let vocab = s.u64("vocab_size", 49408, 2, limits::MAX_VOCAB)?;
    let t_width = s.u64("text_width", 512, 1, limits::MAX_WIDTH)?;
    let t_heads = s.u64("text_heads", 8, 1, limits::MAX_WIDTH)?;
    let t_layers = s.u64("text_layers", 12, 1, limits::MAX_DEPTH)?;
    // open_clip: vision heads = width / head_width (64).
    if v_width % 64 != 0 {
        return Err(value_err("vision_width", format!("must be a multiple of the head width 64, got {v_width}")));
    }
    heads_divide("text_heads", t_width, t_heads)?;
    let n = patches(&image, patch)?;
    let mut b = Builder::new(Task::Contrastive);
    let img = b.input(vec![batch, 3, image[0], image[1]], InputKind::Real);
    let text = b.input(vec![batch, seq], InputKind::Tokens { vocab });
    let image_features = b.scope("visual", |b| -> Result<usize, GraphError> {
        let tokens = patchify(b, img, "conv1", v_width, patch, false)?;
        let cls = b.param("class_embedding", vec![v_width], Init::Normal(0.02));
        let mut h = b.prepend_token(tokens, cls)?;
        let pos = b.param("positional_embedding", vec![n + 1, v_width], Init::Normal(0.02));
        h = b.add_param(h, pos)?;
        h = b.layer_norm("ln_pre", h, 1e-5)?;
        let cfg = BlockCfg {
            heads: v_width / 64,
            mlp: 4 * v_width,
            eps: 1e-5,
            causal: false,
            attn_dropout: 0.0,
            resid_dropout: 0.0,
            mlp_mid_dropout: false,
            gelu_tanh: false,
        };
        for i in 0..v_layers {
            h = b.block(|b| b.scope(format!("transformer.resblocks.{i}"), |b| block(b, h, &CLIP_NAMES, &cfg)))?;
        }
        h = b.layer_norm("ln_post", h, 1e-5)?;
        let pooled = b.select(h, 1, 0);
        let proj = b.param("proj", vec![v_width, embed], Init::Normal(0.02));
        let pooled = b.contiguous(pooled);
        b.linear_proj(pooled, proj)
    })?;
    let text_features = {
        let tok = b.embedding("token_embedding", text, vocab, t_width);
        let pos = b.param("positional_embedding", vec![seq, t_width], Init::Normal(0.01));
        let mut h = b.add_param(tok, pos)?;
        let cfg = BlockCfg {
            heads: t_heads,
            mlp: 4 * t_width,
            eps: 1e-5,
            causal: true,
            attn_dropout: 0.0,
            resid_dropout: 0.0,
            mlp_mid_dropout: false,
            gelu_tanh: false,
        };
        for i in 0..t_layers {
            h = b.block(|b| b.scope(format!("transformer.resblocks.{i}"), |b| block(b, h, &CLIP_NAMES, &cfg)))?;
        }
        h = b.layer_norm("ln_final", h, 1e-5)?;
        // The synthetic captions end with their end-of-text token, which pools the text.
        let pooled = b.select(h, 1, seq - 1);
        let pooled = b.contiguous(pooled);
        let proj = b.param("text_projection", vec![t_width, embed], Init::Normal(0.02));
        b.linear_proj(pooled, proj)?
    };
    let i = b.normalize(image_features);
    let t = b.normalize(text_features);
    // The contrastive loss's learned temperature: the graph's last parameter.
    b.param("logit_scale", vec![], Init::Const((1.0f64 / 0.07).ln()));
    Ok(b.finish(vec![i, t]))
}
