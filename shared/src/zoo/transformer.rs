//! Transformers as their references write them: torchvision's `VisionTransformer` and
//! open_clip's `CLIP`, both on `nn.MultiheadAttention`, and Hugging Face's GPT-2 with its
//! own attention (views of the packed `c_attn` output, the key/value cache) and its
//! Python `gelu_new`.

use super::losses;
use super::{BuildOptions, Settings, ZooError, limits, value_err};
use crate::graph::{Builder, Checkpoint, DType, Graph, GraphError, Init, InputKind, Op, ParamId, Task, ValueId};

type R<T> = Result<T, GraphError>;

fn heads_divide(key: &str, width: u64, heads: u64) -> Result<(), ZooError> {
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(value_err(key, format!("{heads} heads must divide the width {width}")));
    }
    Ok(())
}

fn patches(image: &[u64], patch: u64) -> Result<u64, ZooError> {
    if image.iter().any(|&d| d % patch != 0) {
        return Err(value_err("image", format!("each side must be divisible by patch_size {patch}, got {image:?}")));
    }
    Ok(image.iter().map(|d| d / patch).product())
}

/// `nn.MultiheadAttention(d, heads, batch_first=True)(x, x, x, need_weights=False,
/// attn_mask=mask)` as `F.multi_head_attention_forward` runs it: the batch-first input
/// transposed to `[N, B, D]`, one packed input projection (a matmul on the transposed
/// view, then the bias), the unflatten/transpose/`.contiguous()` that splits q, k and v,
/// scaled dot-product attention on `[B, H, N, hd]` views, and the output projection on
/// the attention output viewed as `[N*B, D]`. Returns `[B, N, D]` (a transposed view).
fn multi_head_attention(b: &mut Builder, x: ValueId, heads: u64, mask: Option<ValueId>, dropout: f64) -> R<ValueId> {
    let s = b.shape(x).to_vec();
    let (batch, n, d) = (s[0], s[1], s[2]);
    let hd = d / heads;
    let (w_in, b_in, w_out, b_out) = (
        b.param("in_proj_weight", vec![3 * d, d], Init::Uniform((6.0 / (4.0 * d as f64)).sqrt())),
        b.param("in_proj_bias", vec![3 * d], Init::Const(0.0)),
        b.param("out_proj.weight", vec![d, d], Init::Uniform(1.0 / (d as f64).sqrt())),
        b.param("out_proj.bias", vec![d], Init::Const(0.0)),
    );
    let start = b.next_node();
    let xt = b.transpose(x, 1, 0);
    let proj = b.linear_with(xt, vec![w_in, b_in], true)?;
    let proj = b.view(proj, vec![n, batch, 3, d])?;
    let proj = b.unsqueeze(proj, 0);
    let proj = b.transpose(proj, 0, 3);
    let proj = b.squeeze(proj, 3);
    let proj = b.contiguous(proj);
    let mut qkv = Vec::with_capacity(3);
    for i in 0..3 {
        let t = b.select(proj, 0, i);
        let t = b.view(t, vec![n, batch * heads, hd])?;
        let t = b.transpose(t, 0, 1);
        qkv.push(b.view(t, vec![batch, heads, n, hd])?);
    }
    let mask = match mask {
        // A [N, N] mask becomes [1, N, N], then [1, 1, N, N] for scaled_dot_product_attention.
        Some(m) => {
            let m = b.unsqueeze(m, 0);
            Some(b.unsqueeze(m, 0))
        }
        None => None,
    };
    let a = b.attention(qkv[0], qkv[1], qkv[2], mask, false, dropout, None)?;
    let a = b.permute(a, vec![2, 0, 1, 3])?;
    let a = b.contiguous(a);
    let a = b.view(a, vec![n * batch, d])?;
    let o = b.linear_with(a, vec![w_out, b_out], true)?;
    let o = b.view(o, vec![n, batch, d])?;
    let out = b.transpose(o, 1, 0);
    // The caller's `x` (query, key and value) stays bound until the module returns.
    b.release(vec![x]);
    // PyTorch's eval-mode fast path takes masks only as booleans and wants an even
    // number of heads.
    if mask.is_none() && heads.is_multiple_of(2) {
        let end = b.next_node();
        b.fused_attention(start..end, x, out, heads);
    }
    Ok(out)
}

/// A patch embedding: `[B, C, H, W]` -> `[B, N, D]` (conv, reshape, permute).
fn patchify(b: &mut Builder, x: ValueId, name: &str, dim: u64, patch: u64, bias: bool) -> R<ValueId> {
    let p = b.conv(name, x, dim, patch, patch, 0, 1, bias)?;
    let s = b.shape(p).to_vec();
    let flat = b.reshape(p, vec![s[0], s[1], s[2] * s[3]])?;
    b.permute(flat, vec![0, 2, 1])
}

/// `cat([token.expand(B, 1, D), x], dim=1)` for a class token value of `D` elements.
fn prepend_token(b: &mut Builder, x: ValueId, token: ValueId) -> R<ValueId> {
    let s = b.shape(x).to_vec();
    let t = b.reshape(token, vec![1, 1, s[2]])?;
    let t = b.expand(t, vec![s[0], 1, s[2]])?;
    b.cat(vec![t, x], 1)
}

pub fn vit(s: &Settings, batch: u64, opts: &BuildOptions) -> Result<Graph, ZooError> {
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
    let h = b.stage(|b| -> R<[ValueId; 3]> {
        let tokens = patchify(b, x, "conv_proj", dim, patch, true)?;
        let cls = b.param_in("class_token", vec![1, 1, dim], Init::Const(0.0));
        let h = prepend_token(b, tokens, cls)?;
        b.scope("encoder", |b| -> R<[ValueId; 3]> {
            let pos = b.param_in("pos_embedding", vec![1, n + 1, dim], Init::Normal(0.02));
            let p = b.add(h, pos)?;
            Ok([h, p, b.dropout(p, dropout)])
        })
    })?;
    // Two locals stay bound while the encoder runs: `VisionTransformer.forward`'s `x` (the
    // token sequence) and `Encoder.forward`'s `input` (after the position embedding).
    let held = [h[0], h[1]];
    let mut h = h[2];
    for i in 0..layers {
        h = b.stage(|b| {
            b.block(|b| {
                b.scope(format!("encoder.layers.encoder_layer_{i}"), |b| -> R<ValueId> {
                    // torchvision's EncoderBlock.
                    let y = b.layer_norm("ln_1", h, 1e-6)?;
                    let y =
                        b.scope("self_attention", |b| multi_head_attention(b, y, heads, None, attention_dropout))?;
                    let y = b.dropout(y, dropout);
                    let x = b.add(y, h)?;
                    let m = b.layer_norm("ln_2", x, 1e-6)?;
                    let m = b.linear("mlp.0", m, mlp, true)?;
                    let m = b.unary(Op::Gelu { tanh: false }, m);
                    let m = b.dropout(m, dropout);
                    let m = b.linear("mlp.3", m, dim, true)?;
                    let m = b.dropout(m, dropout);
                    b.add(x, m)
                })
            })
        })?;
    }
    let out = b.stage(|b| -> R<ValueId> {
        let h = b.scope("encoder", |b| b.layer_norm("ln", h, 1e-6))?;
        b.release(held.to_vec());
        let first = b.select(h, 1, 0);
        b.linear("heads.head", first, classes, true)
    })?;
    let (loss, start) = losses::classify(&mut b, out, opts.loss.label_smoothing)?;
    Ok(b.finish(vec![out], loss, start))
}

/// open_clip's `ResidualAttentionBlock`: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
fn clip_block(b: &mut Builder, x: ValueId, heads: u64, mask: Option<ValueId>) -> R<ValueId> {
    let d = b.shape(x)[2];
    let y = b.layer_norm("ln_1", x, 1e-5)?;
    let y = b.scope("attn", |b| multi_head_attention(b, y, heads, mask, 0.0))?;
    let x = b.add(x, y)?;
    let m = b.layer_norm("ln_2", x, 1e-5)?;
    let m = b.linear("mlp.c_fc", m, 4 * d, true)?;
    let m = b.unary(Op::Gelu { tanh: false }, m);
    let m = b.linear("mlp.c_proj", m, d, true)?;
    b.add(x, m)
}

pub fn clip(s: &Settings, batch: u64, opts: &BuildOptions) -> Result<Graph, ZooError> {
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
    let _ = opts;
    let mut b = Builder::new(Task::Contrastive);
    let img = b.input(vec![batch, 3, image[0], image[1]], InputKind::Real);
    let text = b.input(vec![batch, seq], InputKind::Tokens { vocab });
    let image_features = b.scope("visual", |b| -> R<ValueId> {
        let tokens = patchify(b, img, "conv1", v_width, patch, false)?;
        // `cat([_expand_token(class_embedding, B).to(x.dtype), x])`, then
        // `x + positional_embedding.to(x.dtype)`: under autocast the residual stream
        // stays in the half type.
        let cls = b.param_in("class_embedding", vec![v_width], Init::Normal(0.02));
        let s = b.shape(tokens).to_vec();
        let t = b.view(cls, vec![1, 1, s[2]])?;
        let t = b.expand(t, vec![s[0], 1, s[2]])?;
        let t = b.cast_like(t, tokens);
        let mut h = b.cat(vec![t, tokens], 1)?;
        let pos = b.param_in("positional_embedding", vec![n + 1, v_width], Init::Normal(0.02));
        let pos = b.cast_like(pos, h);
        h = b.add(h, pos)?;
        h = b.layer_norm("ln_pre", h, 1e-5)?;
        for i in 0..v_layers {
            h = b.block(|b| b.scope(format!("transformer.resblocks.{i}"), |b| clip_block(b, h, v_width / 64, None)))?;
        }
        h = b.layer_norm("ln_post", h, 1e-5)?;
        let pooled = b.select(h, 1, 0);
        let proj = b.param_in("proj", vec![v_width, embed], Init::Normal(0.02));
        let f = b.matmul(pooled, proj)?;
        b.normalize(f)
    })?;
    let text_features = {
        let tok = b.embedding("token_embedding", text, vocab, t_width);
        let pos = b.param_in("positional_embedding", vec![seq, t_width], Init::Normal(0.01));
        let mut h = b.add(tok, pos)?;
        let mask = b.buffer("attn_mask", vec![seq, seq], DType::F32, Init::CausalMask);
        for i in 0..t_layers {
            h = b.block(|b| {
                b.scope(format!("transformer.resblocks.{i}"), |b| {
                    let m = b.param_value(mask);
                    clip_block(b, h, t_heads, Some(m))
                })
            })?;
        }
        h = b.layer_norm("ln_final", h, 1e-5)?;
        // text_global_pool: the features at each caption's end-of-text token, the
        // largest id (argmax), as open_clip does.
        let eot = b.argmax(text);
        let pooled = b.index_rows(h, eot)?;
        let proj = b.param_in("text_projection", vec![t_width, embed], Init::Normal(0.02));
        let f = b.matmul(pooled, proj)?;
        b.normalize(f)?
    };
    let scale = b.param_in("logit_scale", vec![], Init::Const((1.0f64 / 0.07).ln()));
    let scale = b.unary(Op::Exp, scale);
    let (loss, start) = losses::clip(&mut b, image_features, text_features, scale)?;
    Ok(b.finish(vec![image_features, text_features, scale], loss, start))
}

/// Hugging Face's `NewGELUActivation` ("gelu_new"), spelled out in Python:
/// `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`.
fn gelu_new(b: &mut Builder, x: ValueId) -> R<ValueId> {
    let half = b.mul_scalar(x, 0.5);
    let cube = b.pow_scalar(x, 3.0);
    let cube = b.mul_scalar(cube, 0.044715);
    let inner = b.add(x, cube)?;
    let inner = b.mul_scalar(inner, (2.0 / std::f64::consts::PI).sqrt());
    let t = b.unary(Op::Tanh, inner);
    let t = b.add_scalar(t, 1.0);
    b.mul(half, t)
}

struct Gpt2Cfg {
    heads: u64,
    attn_drop: f64,
    resid_drop: f64,
    use_cache: bool,
}

/// `GPT2Block` with the SDPA attention of transformers 5: `c_attn` split into q, k and v
/// views, k and v copied into the key/value cache when it is on (and attention then
/// reads the cached copies), causal attention with dropout, `gelu_new`.
/// Returns the block output and the cache's tensors.
fn gpt2_block(b: &mut Builder, x: ValueId, cfg: &Gpt2Cfg) -> R<(ValueId, Vec<ValueId>)> {
    let s = b.shape(x).to_vec();
    let (batch, seq, d) = (s[0], s[1], s[2]);
    let hd = d / cfg.heads;
    let h = b.layer_norm("ln_1", x, 1e-5)?;
    let (a, cache) = b.scope("attn", |b| -> R<(ValueId, Vec<ValueId>)> {
        let qkv = b.conv1d_hf("c_attn", h, 3 * d)?;
        let parts = b.split(qkv, 2, d)?;
        let heads = |b: &mut Builder, t: ValueId| -> R<ValueId> {
            let t = b.view(t, vec![batch, seq, cfg.heads, hd])?;
            Ok(b.transpose(t, 1, 2))
        };
        let k = heads(b, parts[1])?;
        let v = heads(b, parts[2])?;
        let q = heads(b, parts[0])?;
        let (k, v, cache) = if cfg.use_cache {
            // DynamicLayer.update on an empty cache: torch.cat copies keys and values.
            let k = b.cat(vec![k], 2)?;
            let v = b.cat(vec![v], 2)?;
            (k, v, vec![k, v])
        } else {
            (k, v, vec![])
        };
        let a = b.attention(q, k, v, None, true, cfg.attn_drop, Some((hd as f64).powf(-0.5)))?;
        let a = b.transpose(a, 1, 2);
        let a = b.contiguous(a);
        let a = b.reshape(a, vec![batch, seq, d])?;
        let a = b.contiguous(a);
        let a = b.conv1d_hf("c_proj", a, d)?;
        Ok((b.dropout(a, cfg.resid_drop), cache))
    })?;
    let x = b.add(a, x)?;
    let m = b.layer_norm("ln_2", x, 1e-5)?;
    let m = b.scope("mlp", |b| -> R<ValueId> {
        let m = b.conv1d_hf("c_fc", m, 4 * d)?;
        let m = gelu_new(b, m)?;
        let m = b.conv1d_hf("c_proj", m, d)?;
        Ok(b.dropout(m, cfg.resid_drop))
    })?;
    Ok((b.add(x, m)?, cache))
}

pub fn gpt2(s: &Settings, batch: u64, opts: &BuildOptions) -> Result<Graph, ZooError> {
    let n_layer = s.u64("n_layer", 12, 1, limits::MAX_DEPTH)?;
    let n_embd = s.u64("n_embd", 768, 1, limits::MAX_WIDTH)?;
    let n_head = s.u64("n_head", 12, 1, limits::MAX_WIDTH)?;
    let n_positions = s.u64("n_positions", 1024, 1, limits::MAX_SEQ)?;
    let vocab = s.u64("vocab_size", 50257, 2, limits::MAX_VOCAB)?;
    let seq = s.u64("seq", n_positions, 2, limits::MAX_SEQ)?;
    let resid = s.f64("resid_pdrop", 0.1, 0.0, 0.99)?;
    let embd = s.f64("embd_pdrop", 0.1, 0.0, 0.99)?;
    let attn = s.f64("attn_pdrop", 0.1, 0.0, 0.99)?;
    // HF's default; gradient checkpointing in training turns the cache off.
    let use_cache = s.flag("use_cache", true)? && opts.checkpoint != Checkpoint::Blocks;
    heads_divide("n_head", n_embd, n_head)?;
    if seq > n_positions {
        return Err(value_err("seq", format!("{seq} tokens exceed n_positions {n_positions}")));
    }
    let mut b = Builder::new(Task::LanguageModel { vocab });
    let ids = b.input(vec![batch, seq], InputKind::Tokens { vocab });
    let cfg = Gpt2Cfg { heads: n_head, attn_drop: attn, resid_drop: resid, use_cache };
    let mut cache = Vec::new();
    let (h, wte) = b.scope("transformer", |b| -> R<(ValueId, ParamId)> {
        let wte = b.scope("wte", |b| b.param("weight", vec![vocab, n_embd], Init::Normal(0.02)));
        let mut h = b.stage(|b| -> R<ValueId> {
            let ids = b.view(ids, vec![batch, seq])?;
            let table = b.param_value(wte);
            let tok = b.embedding_with(ids, table);
            let positions = b.buffer("position_ids", vec![seq], DType::I64, Init::Arange);
            let positions = b.param_value(positions);
            let positions = b.unsqueeze(positions, 0);
            let wpe = b.scope("wpe", |b| b.param_in("weight", vec![n_positions, n_embd], Init::Normal(0.02)));
            let pos = b.embedding_with(positions, wpe);
            let h = b.add(tok, pos)?;
            Ok(b.dropout(h, embd))
        })?;
        for i in 0..n_layer {
            let (out, kv) = b.stage(|b| b.block(|b| b.scope(format!("h.{i}"), |b| gpt2_block(b, h, &cfg))))?;
            h = out;
            cache.extend(kv);
        }
        let h = b.stage(|b| b.layer_norm("ln_f", h, 1e-5))?;
        Ok((h, wte))
    })?;
    let logits = b.linear_with(h, vec![wte], false)?;
    let (loss, start) = losses::causal_lm(&mut b, logits, ids)?;
    let mut returned = vec![logits];
    returned.extend(cache);
    Ok(b.finish_with_loss_inside(returned, loss, start))
}
