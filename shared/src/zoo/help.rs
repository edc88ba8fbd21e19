//! Units and one-line help for every model key, named as in the reference constructors.
//! A key any builder reads must have an entry (`every_model_key_has_help`).

/// (key, unit, help).
const HELP: &[(&str, &str, &str)] = &[
    ("in_features", "features", "Input features per sample (a flat vector)."),
    ("hidden", "widths", "Hidden layer widths, comma-separated: one Linear -> ReLU each."),
    ("channels", "channels", "Channels per stage, comma-separated (UNet: encoder levels)."),
    ("in_channels", "channels", "Channels of the input image or volume (3 for RGB, 1 for CT/MRI)."),
    ("out_channels", "classes", "Output channels of a segmentation head: one per class."),
    ("num_classes", "classes", "Classes the classifier predicts."),
    ("image", "pixels", "Input image size: one size (square) or H,W."),
    ("volume", "voxels", "Input volume size: one size (cube) or D,H,W."),
    ("seq", "tokens", "Sequence length of a sample."),
    ("patch_size", "pixels", "Side of the square patches the image is cut into."),
    ("hidden_dim", "width", "Transformer width (embedding size)."),
    ("mlp_dim", "width", "Width of each transformer block's MLP."),
    ("num_layers", "layers", "Transformer blocks."),
    ("num_heads", "heads", "Attention heads per block."),
    ("dropout", "probability", "Dropout probability in the blocks (0: off)."),
    (
        "attention_dropout",
        "probability",
        "Dropout on attention weights (0: off; above 0 forces the math attention path).",
    ),
    ("strides", "factors", "Downsampling stride of each encoder level after the first, comma-separated."),
    ("num_res_units", "units", "Residual units per level (MONAI UNet's num_res_units)."),
    ("norm", "", "Normalization layer: instance or batch."),
    ("feature_size", "channels", "SwinUNETR feature size: the first stage's width; MONAI needs a multiple of 12."),
    ("embed_dim", "width", "Joint image-text embedding size."),
    ("vision_width", "width", "Vision tower width (a multiple of 64: one head per 64 channels)."),
    ("vision_layers", "layers", "Vision tower blocks."),
    ("text_width", "width", "Text tower width."),
    ("text_layers", "layers", "Text tower blocks."),
    ("text_heads", "heads", "Text tower attention heads."),
    ("vocab_size", "tokens", "Vocabulary size (the embedding and output projection rows)."),
    ("n_positions", "tokens", "Longest sequence the position embedding covers."),
    ("n_embd", "width", "GPT-2 width (embedding size)."),
    ("n_layer", "layers", "GPT-2 blocks."),
    ("n_head", "heads", "GPT-2 attention heads per block."),
    ("embd_pdrop", "probability", "Dropout on the token and position embeddings."),
    ("resid_pdrop", "probability", "Dropout on each block's residual branches."),
    ("attn_pdrop", "probability", "Dropout on attention weights (above 0 forces the math attention path)."),
    ("use_cache", "", "Return the key/value cache from each block (Hugging Face's default; off under checkpointing)."),
];

/// The unit and help of `key` (empty when it has none, which a test refuses).
pub fn of(key: &str) -> (&'static str, &'static str) {
    HELP.iter().find(|(k, _, _)| *k == key).map_or(("", ""), |&(_, unit, help)| (unit, help))
}
