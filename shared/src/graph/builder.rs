//! The `Builder`: a graph made op by op, each output's shape inferred and checked as
//! PyTorch would, with the module path of every parameter.

use std::ops::Range;

use super::*;

/// Builds a graph op by op, checking shapes as it goes. Names are module paths
/// (`layer1.0.conv1`), used in errors and as the trainer's variable names.
pub struct Builder {
    g: Graph,
    prefix: Vec<String>,
}

type R<T> = Result<T, GraphError>;

impl Builder {
    pub fn new(task: Task) -> Builder {
        Builder {
            g: Graph {
                values: Vec::new(),
                params: Vec::new(),
                nodes: Vec::new(),
                inputs: Vec::new(),
                returned: Vec::new(),
                loss: ValueId(0),
                loss_start: 0,
                returns_after: 0,
                task,
                stages: Vec::new(),
                blocks: Vec::new(),
                fused_attention: Vec::new(),
                surface: None,
                frames: Vec::new(),
            },
            prefix: Vec::new(),
        }
    }

    /// Ends the graph: `returned` is what the model hands the training loop, `loss` the
    /// scalar, `loss_start` the first node that computes it.
    pub fn finish(mut self, returned: Vec<ValueId>, loss: ValueId, loss_start: usize) -> Graph {
        self.g.returned = returned;
        self.g.loss = loss;
        self.g.loss_start = loss_start;
        self.g.returns_after = loss_start;
        self.g
    }

    /// Like `finish`, for a model that computes its loss itself and returns it with its
    /// outputs (the loop's previous outputs stay alive until then).
    pub fn finish_with_loss_inside(self, returned: Vec<ValueId>, loss: ValueId, loss_start: usize) -> Graph {
        let mut g = self.finish(returned, loss, loss_start);
        g.returns_after = g.nodes.len();
        g
    }

    /// The index the next node will get.
    pub fn next_node(&self) -> usize {
        self.g.nodes.len()
    }

    /// A float32 value no node makes and no batch holds: the surface term's map.
    pub fn side_input(&mut self, shape: Shape) -> ValueId {
        self.value(shape, DType::F32, false)
    }

    pub fn surface_term(&mut self, term: SurfaceTerm) {
        self.g.surface = Some(term);
    }

    /// Records nodes `nodes` as a self-attention block PyTorch may fuse (`FusedAttention`).
    pub fn fused_attention(&mut self, nodes: Range<usize>, input: ValueId, output: ValueId, heads: u64) {
        self.g.fused_attention.push(FusedAttention { nodes, input, output, heads });
    }

    /// Runs `f` with `name` appended to the module path.
    pub fn scope<T>(&mut self, name: impl Into<String>, f: impl FnOnce(&mut Builder) -> T) -> T {
        self.prefix.push(name.into());
        let out = f(self);
        self.prefix.pop();
        out
    }

    /// Runs `f` and records its nodes as one top-level stage (for `checkpoint_sequential`).
    pub fn stage<T>(&mut self, f: impl FnOnce(&mut Builder) -> T) -> T {
        let start = self.g.nodes.len();
        let out = f(self);
        let end = self.g.nodes.len();
        if end > start {
            self.g.stages.push(start..end);
        }
        out
    }

    /// Runs `f` and records its nodes as one unit of the reference's per-block
    /// checkpointing.
    pub fn block<T>(&mut self, f: impl FnOnce(&mut Builder) -> T) -> T {
        let start = self.g.nodes.len();
        let out = f(self);
        let end = self.g.nodes.len();
        if end > start {
            self.g.blocks.push(start..end);
        }
        out
    }

    fn path(&self, leaf: &str) -> String {
        let mut parts: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
        if !leaf.is_empty() {
            parts.push(leaf);
        }
        parts.join(".")
    }

    pub fn err(&self, op: &'static str, reason: impl Into<String>) -> GraphError {
        GraphError { op, name: self.path(""), reason: reason.into() }
    }

    pub fn shape(&self, v: ValueId) -> &[u64] {
        &self.g.values[v].shape
    }

    pub fn dtype(&self, v: ValueId) -> DType {
        self.g.values[v].dtype
    }

    pub fn input(&mut self, shape: Shape, kind: InputKind) -> ValueId {
        let dtype = match kind {
            InputKind::Real | InputKind::ClassMap { .. } | InputKind::Mask => DType::F32,
            InputKind::Tokens { .. } | InputKind::ClassIndex { .. } => DType::I64,
        };
        let v = self.value(shape, dtype, false);
        self.g.inputs.push((v, kind));
        v
    }

    fn new_param(&mut self, name: &str, shape: Shape, dtype: DType, init: Init, trainable: bool) -> ParamId {
        self.g.params.push(Param { name: self.path(name), shape, dtype, init, trainable });
        ParamId(self.g.params.len() - 1)
    }

    /// A trainable fp32 parameter (declared; use [`Builder::param_value`] to read it).
    pub fn param(&mut self, name: &str, shape: Shape, init: Init) -> ParamId {
        self.new_param(name, shape, DType::F32, init, true)
    }

    pub fn buffer(&mut self, name: &str, shape: Shape, dtype: DType, init: Init) -> ParamId {
        self.new_param(name, shape, dtype, init, false)
    }

    /// Reads parameter `p` as a value.
    pub fn param_value(&mut self, p: ParamId) -> ValueId {
        let (shape, dtype, grad) = {
            let p = &self.g.params[p];
            (p.shape.clone(), p.dtype, p.trainable)
        };
        let v = self.value(shape, dtype, grad);
        self.g.nodes.push(Node { op: Op::Param, inputs: vec![], params: vec![p], outputs: vec![v] });
        v
    }

    /// A new parameter, read as a value at once.
    pub fn param_in(&mut self, name: &str, shape: Shape, init: Init) -> ValueId {
        let p = self.param(name, shape, init);
        self.param_value(p)
    }

    fn value(&mut self, shape: Shape, dtype: DType, grad: bool) -> ValueId {
        self.g.values.push(Value { shape, dtype, requires_grad: grad });
        ValueId(self.g.values.len() - 1)
    }

    fn grad_of(&self, inputs: &[ValueId], params: &[ParamId]) -> bool {
        inputs.iter().any(|&v| self.g.values[v].requires_grad) || params.iter().any(|&p| self.g.params[p].trainable)
    }

    /// Appends a node with one output of `shape` and `dtype`.
    fn push_typed(
        &mut self,
        op: Op,
        inputs: Vec<ValueId>,
        params: Vec<ParamId>,
        shape: Shape,
        dtype: DType,
    ) -> ValueId {
        let grad = dtype == DType::F32 && self.grad_of(&inputs, &params) && !matches!(op, Op::Argmax);
        let out = self.value(shape, dtype, grad);
        self.g.nodes.push(Node { op, inputs, params, outputs: vec![out] });
        out
    }

    /// Appends a node whose output has its first input's dtype.
    fn push(&mut self, op: Op, inputs: Vec<ValueId>, params: Vec<ParamId>, shape: Shape) -> ValueId {
        let dtype = inputs.first().map_or(DType::F32, |&v| self.g.values[v].dtype);
        self.push_typed(op, inputs, params, shape, dtype)
    }

    fn init_bound(fan_in: u64) -> Init {
        Init::Uniform(1.0 / (fan_in.max(1) as f64).sqrt())
    }

    /// A weight and (optionally) a bias of `out` entries, both with PyTorch's default
    /// init for this fan-in, in the current scope.
    fn weight_and_bias(&mut self, weight: Shape, out: u64, fan_in: u64, bias: bool) -> Vec<ParamId> {
        let mut params = vec![self.param("weight", weight, Builder::init_bound(fan_in))];
        if bias {
            params.push(self.param("bias", vec![out], Builder::init_bound(fan_in)));
        }
        params
    }

    /// Params as values, in order.
    fn values_of(&mut self, params: &[ParamId]) -> Vec<ValueId> {
        params.iter().map(|&p| self.param_value(p)).collect()
    }

    /// The number of spatial dimensions of a `[B, C, ...]` input (1 to 3).
    fn spatial_dims(&self, op: &'static str, shape: &[u64]) -> R<usize> {
        let nd = shape.len().saturating_sub(2);
        if !(1..=3).contains(&nd) {
            return Err(self.err(op, format!("expects [B, C, ...] with 1 to 3 spatial dims, got {shape:?}")));
        }
        Ok(nd)
    }

    /// `nn.Linear(in, out)` over the last dimension (weight `[out, in]`).
    pub fn linear(&mut self, name: &str, x: ValueId, out: u64, bias: bool) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let Some(&inf) = shape.last() else {
            return Err(self.err("linear", "needs at least one dimension"));
        };
        let params = self.scope(name, |b| b.weight_and_bias(vec![out, inf], out, inf, bias));
        self.linear_with(x, params, bias)
    }

    /// `F.linear` with existing parameters `[weight, bias?]` (tied weights, MHA's packed
    /// projections).
    pub fn linear_with(&mut self, x: ValueId, params: Vec<ParamId>, bias: bool) -> R<ValueId> {
        let mut shape = self.shape(x).to_vec();
        let w = self.g.params[params[0]].shape.clone();
        if w.len() != 2 || shape.last() != Some(&w[1]) {
            return Err(self.err("linear", format!("input {shape:?} does not match the weight {w:?}")));
        }
        if let Some(last) = shape.last_mut() {
            *last = w[0];
        }
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        Ok(self.push(Op::Linear { bias }, inputs, vec![], shape))
    }

    /// Hugging Face's `Conv1D(out, in)`: weight `[in, out]`, bias.
    pub fn conv1d_hf(&mut self, name: &str, x: ValueId, out: u64) -> R<ValueId> {
        let mut shape = self.shape(x).to_vec();
        let Some(&inf) = shape.last() else {
            return Err(self.err("conv1d", "needs at least one dimension"));
        };
        let params = self.scope(name, |b| {
            vec![b.param("weight", vec![inf, out], Init::Normal(0.02)), b.param("bias", vec![out], Init::Const(0.0))]
        });
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        Ok(self.push(Op::Conv1dHf, inputs, vec![], shape))
    }

    fn conv_out(&self, op: &'static str, size: u64, kernel: u64, stride: u64, padding: u64) -> R<u64> {
        let padded = size.saturating_add(padding.saturating_mul(2));
        if stride == 0 || padded < kernel {
            return Err(self.err(op, format!("kernel {kernel} does not fit a size of {size} with padding {padding}")));
        }
        Ok((padded - kernel) / stride + 1)
    }

    /// A transposed convolution's output size along one dimension.
    fn conv_transpose_out(&self, size: u64, kernel: u64, stride: u64, padding: u64, output_padding: u64) -> R<u64> {
        let full = size.saturating_sub(1).saturating_mul(stride).saturating_add(kernel).saturating_add(output_padding);
        if full < padding.saturating_mul(2).saturating_add(1) {
            return Err(self.err("conv_transpose", format!("padding {padding} leaves nothing of size {size}")));
        }
        Ok(full - 2 * padding)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &mut self,
        name: &str,
        x: ValueId,
        out: u64,
        kernel: u64,
        stride: u64,
        padding: u64,
        groups: u64,
        bias: bool,
    ) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let nd = self.spatial_dims("conv", &shape)?;
        let cin = shape[1];
        let (o, params) = self.scope(name, |b| -> R<(Shape, Vec<ParamId>)> {
            if groups == 0 || !cin.is_multiple_of(groups) || !out.is_multiple_of(groups) {
                return Err(b.err("conv", format!("{groups} groups must divide {cin} input and {out} output channels")));
            }
            let mut o = vec![shape[0], out];
            for &s in &shape[2..] {
                o.push(b.conv_out("conv", s, kernel, stride, padding)?);
            }
            let fan_in = cin / groups * kernel.pow(nd as u32);
            let mut w = vec![out, cin / groups];
            w.extend(std::iter::repeat_n(kernel, nd));
            Ok((o, b.weight_and_bias(w, out, fan_in, bias)))
        })?;
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        Ok(self.push(Op::Conv { nd: nd as u8, kernel, stride, padding, groups, bias }, inputs, vec![], o))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn conv_transpose(
        &mut self,
        name: &str,
        x: ValueId,
        out: u64,
        kernel: u64,
        stride: u64,
        padding: u64,
        output_padding: u64,
        bias: bool,
    ) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let nd = self.spatial_dims("conv_transpose", &shape)?;
        let cin = shape[1];
        let mut o = vec![shape[0], out];
        for &s in &shape[2..] {
            o.push(self.conv_transpose_out(s, kernel, stride, padding, output_padding)?);
        }
        let params = self.scope(name, |b| {
            // ConvTranspose's weight is [in, out, k...] and its fan-in is out * k^nd.
            let fan_in = out * kernel.pow(nd as u32);
            let mut w = vec![cin, out];
            w.extend(std::iter::repeat_n(kernel, nd));
            b.weight_and_bias(w, out, fan_in, bias)
        });
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        let op = Op::ConvTranspose { nd: nd as u8, kernel, stride, padding, output_padding, bias };
        Ok(self.push(op, inputs, vec![], o))
    }

    /// A convolution with existing parameters `[weight, bias?]` (an imported model's):
    /// the weight `[out, in / groups, k...]` decides the output channels and the kernel.
    pub fn conv_with(
        &mut self,
        x: ValueId,
        params: Vec<ParamId>,
        stride: u64,
        padding: u64,
        groups: u64,
    ) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let nd = self.spatial_dims("conv", &shape)?;
        let w = self.g.params[params[0]].shape.clone();
        let bias = params.len() > 1;
        if w.len() != nd + 2 || w[2..].iter().any(|&k| k != w[2]) {
            return Err(self.err("conv", format!("weight {w:?} is not a square kernel for {nd} spatial dims")));
        }
        if groups == 0 || w[1].saturating_mul(groups) != shape[1] || !w[0].is_multiple_of(groups) {
            return Err(
                self.err("conv", format!("input {shape:?} does not match the weight {w:?} with {groups} groups"))
            );
        }
        let kernel = w[2];
        let mut o = vec![shape[0], w[0]];
        for &s in &shape[2..] {
            o.push(self.conv_out("conv", s, kernel, stride, padding)?);
        }
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        Ok(self.push(Op::Conv { nd: nd as u8, kernel, stride, padding, groups, bias }, inputs, vec![], o))
    }

    /// A transposed convolution with existing parameters `[weight, bias?]`, weight
    /// `[in, out, k...]`.
    pub fn conv_transpose_with(
        &mut self,
        x: ValueId,
        params: Vec<ParamId>,
        stride: u64,
        padding: u64,
        output_padding: u64,
    ) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let nd = self.spatial_dims("conv_transpose", &shape)?;
        let w = self.g.params[params[0]].shape.clone();
        let bias = params.len() > 1;
        if w.len() != nd + 2 || w[2..].iter().any(|&k| k != w[2]) || w[0] != shape[1] {
            return Err(self.err("conv_transpose", format!("input {shape:?} does not match the weight {w:?}")));
        }
        let (out, kernel) = (w[1], w[2]);
        let mut o = vec![shape[0], out];
        for &s in &shape[2..] {
            o.push(self.conv_transpose_out(s, kernel, stride, padding, output_padding)?);
        }
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        let op = Op::ConvTranspose { nd: nd as u8, kernel, stride, padding, output_padding, bias };
        Ok(self.push(op, inputs, vec![], o))
    }

    /// Training-mode batch norm with existing `[weight, bias, running_mean, running_var,
    /// num_batches_tracked]`.
    pub fn batch_norm_with(&mut self, x: ValueId, params: Vec<ParamId>, eps: f64) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let c = shape.get(1).copied().ok_or_else(|| self.err("batch_norm", "needs [B, C, ...]"))?;
        if numel(&shape) / c.max(1) < 2 {
            return Err(
                self.err("batch_norm", format!("expected more than 1 value per channel when training, got {shape:?}"))
            );
        }
        if params.iter().take(4).any(|&p| self.g.params[p].shape != [c]) {
            return Err(self.err("batch_norm", format!("parameters do not have {c} channels")));
        }
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        Ok(self.push(Op::BatchNorm { eps }, inputs, vec![], shape))
    }

    /// Layer norm over the last dimension with existing `[weight, bias]` (or none).
    pub fn layer_norm_with(&mut self, x: ValueId, params: Vec<ParamId>, eps: f64) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let d = *shape.last().ok_or_else(|| self.err("layer_norm", "needs a dimension"))?;
        if params.iter().any(|&p| self.g.params[p].shape != [d]) {
            return Err(self.err("layer_norm", format!("parameters do not have {d} entries")));
        }
        let affine = !params.is_empty();
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        Ok(self.push(Op::LayerNorm { eps, affine }, inputs, vec![], shape))
    }

    /// The graph's parameter `p`.
    pub fn param_spec(&self, p: ParamId) -> &Param {
        &self.g.params[p]
    }

    pub fn batch_norm(&mut self, name: &str, x: ValueId) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let c = shape.get(1).copied().ok_or_else(|| self.err("batch_norm", "needs [B, C, ...]"))?;
        if numel(&shape) / c.max(1) < 2 {
            return Err(
                self.err("batch_norm", format!("expected more than 1 value per channel when training, got {shape:?}"))
            );
        }
        let params = self.scope(name, |b| {
            vec![
                b.param("weight", vec![c], Init::Const(1.0)),
                b.param("bias", vec![c], Init::Const(0.0)),
                b.buffer("running_mean", vec![c], DType::F32, Init::Const(0.0)),
                b.buffer("running_var", vec![c], DType::F32, Init::Const(1.0)),
                b.buffer("num_batches_tracked", vec![], DType::I64, Init::Const(0.0)),
            ]
        });
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        Ok(self.push(Op::BatchNorm { eps: 1e-5 }, inputs, vec![], shape))
    }

    pub fn instance_norm(&mut self, x: ValueId) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        if shape.len() < 3 {
            return Err(self.err("instance_norm", format!("needs [B, C, ...spatial], got {shape:?}")));
        }
        if numel(&shape[2..]) < 2 {
            // PyTorch refuses this in training mode.
            return Err(self.err(
                "instance_norm",
                format!("expected more than 1 spatial element when training, got {shape:?}; use a larger input"),
            ));
        }
        Ok(self.push(Op::InstanceNorm { eps: 1e-5 }, vec![x], vec![], shape))
    }

    pub fn layer_norm(&mut self, name: &str, x: ValueId, eps: f64) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let d = *shape.last().ok_or_else(|| self.err("layer_norm", "needs a dimension"))?;
        let params = self.scope(name, |b| {
            vec![b.param("weight", vec![d], Init::Const(1.0)), b.param("bias", vec![d], Init::Const(0.0))]
        });
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        Ok(self.push(Op::LayerNorm { eps, affine: true }, inputs, vec![], shape))
    }

    /// Layer norm without parameters (`F.layer_norm(x, [C])`).
    pub fn layer_norm_plain(&mut self, x: ValueId) -> ValueId {
        let shape = self.shape(x).to_vec();
        self.push(Op::LayerNorm { eps: 1e-5, affine: false }, vec![x], vec![], shape)
    }

    /// A TorchScript module applied to `x`, returning a tensor of `shape`.
    pub fn script(&mut self, x: ValueId, shape: Shape) -> ValueId {
        self.push(Op::Script, vec![x], vec![], shape)
    }

    /// `Op::Release` of `held`: values a Python frame kept bound while later ops ran,
    /// going when it returns.
    pub fn release(&mut self, held: Vec<ValueId>) {
        self.g.nodes.push(Node { op: Op::Release, inputs: held, params: vec![], outputs: vec![] });
    }

    pub fn unary(&mut self, op: Op, x: ValueId) -> ValueId {
        let shape = self.shape(x).to_vec();
        self.push(op, vec![x], vec![], shape)
    }

    pub fn prelu(&mut self, name: &str, x: ValueId) -> ValueId {
        let shape = self.shape(x).to_vec();
        let p = self.scope(name, |b| b.param("weight", vec![1], Init::Const(0.25)));
        let w = self.param_value(p);
        self.push(Op::Prelu, vec![x, w], vec![], shape)
    }

    fn binary(&mut self, op: Op, a: ValueId, b: ValueId) -> R<ValueId> {
        let name = op.name();
        let shape = broadcast(self.shape(a), self.shape(b))
            .ok_or_else(|| self.err(name, format!("cannot broadcast {:?} with {:?}", self.shape(a), self.shape(b))))?;
        Ok(self.push(op, vec![a, b], vec![], shape))
    }

    pub fn add(&mut self, a: ValueId, b: ValueId) -> R<ValueId> {
        self.binary(Op::Add, a, b)
    }

    pub fn sub(&mut self, a: ValueId, b: ValueId) -> R<ValueId> {
        self.binary(Op::Sub, a, b)
    }

    pub fn mul(&mut self, a: ValueId, b: ValueId) -> R<ValueId> {
        self.binary(Op::Mul, a, b)
    }

    pub fn div(&mut self, a: ValueId, b: ValueId) -> R<ValueId> {
        self.binary(Op::Div, a, b)
    }

    /// `a += b`: `b` broadcasts onto `a`'s shape.
    pub fn add_inplace(&mut self, a: ValueId, b: ValueId) -> R<ValueId> {
        let shape = self.shape(a).to_vec();
        if broadcast(&shape, self.shape(b)).as_deref() != Some(shape.as_slice()) {
            return Err(self.err("add_", format!("cannot add {:?} into {shape:?}", self.shape(b))));
        }
        Ok(self.push(Op::AddInplace, vec![a, b], vec![], shape))
    }

    pub fn mul_scalar(&mut self, x: ValueId, s: f64) -> ValueId {
        self.unary(Op::MulScalar { s }, x)
    }

    pub fn add_scalar(&mut self, x: ValueId, s: f64) -> ValueId {
        self.unary(Op::AddScalar { s }, x)
    }

    pub fn rsub_scalar(&mut self, x: ValueId, s: f64) -> ValueId {
        self.unary(Op::RsubScalar { s }, x)
    }

    pub fn pow_scalar(&mut self, x: ValueId, e: f64) -> ValueId {
        self.unary(Op::PowScalar { e }, x)
    }

    pub fn cat(&mut self, xs: Vec<ValueId>, dim: usize) -> R<ValueId> {
        let mut shape = self.shape(xs[0]).to_vec();
        if dim >= shape.len() {
            return Err(self.err("cat", format!("no dimension {dim} in {shape:?}")));
        }
        for &x in &xs[1..] {
            let s = self.shape(x);
            let same_rest =
                s.len() == shape.len() && s.iter().zip(&shape).enumerate().all(|(i, (a, b))| i == dim || a == b);
            if !same_rest {
                return Err(self.err("cat", format!("cannot concatenate {s:?} with {shape:?} along {dim}")));
            }
            shape[dim] += s[dim];
        }
        Ok(self.push(Op::Cat { dim }, xs, vec![], shape))
    }

    pub fn max_pool(&mut self, x: ValueId, kernel: u64, stride: u64, padding: u64) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let nd = self.spatial_dims("max_pool", &shape)?;
        let mut o = shape[..2].to_vec();
        for &s in &shape[2..] {
            o.push(self.conv_out("max_pool", s, kernel, stride, padding)?);
        }
        Ok(self.push(Op::MaxPool { nd: nd as u8, kernel, stride, padding }, vec![x], vec![], o))
    }

    /// Average pooling (`count_include_pad=True`).
    pub fn avg_pool(&mut self, x: ValueId, kernel: u64, stride: u64, padding: u64) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let nd = self.spatial_dims("avg_pool", &shape)?;
        let mut o = shape[..2].to_vec();
        for &s in &shape[2..] {
            o.push(self.conv_out("avg_pool", s, kernel, stride, padding)?);
        }
        Ok(self.push(Op::AvgPool { nd: nd as u8, kernel, stride, padding }, vec![x], vec![], o))
    }

    /// `F.interpolate(x, size)` over the spatial dimensions.
    pub fn upsample(
        &mut self,
        x: ValueId,
        linear: bool,
        align_corners: bool,
        size: Vec<u64>,
        scales: Vec<f64>,
    ) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        if shape.len() != size.len() + 2 || !(1..=3).contains(&size.len()) || size.contains(&0) {
            return Err(self.err("upsample", format!("cannot resize {shape:?} to {size:?}")));
        }
        let mut o = shape[..2].to_vec();
        o.extend(&size);
        Ok(self.push(Op::Upsample { linear, align_corners, size, scales }, vec![x], vec![], o))
    }

    /// `torch.arange(end)` (int64).
    pub fn arange(&mut self, end: u64) -> ValueId {
        self.push_typed(Op::Arange { end }, vec![], vec![], vec![end], DType::I64)
    }

    /// `x.gather(dim, index)`: shaped like the int64 `index`.
    pub fn gather(&mut self, x: ValueId, dim: usize, index: ValueId) -> R<ValueId> {
        let (xs, is) = (self.shape(x).to_vec(), self.shape(index).to_vec());
        if self.dtype(index) != DType::I64 || xs.len() != is.len() || dim >= xs.len() {
            return Err(self.err("gather", format!("index {is:?} does not gather from {xs:?} along {dim}")));
        }
        if xs.iter().zip(&is).enumerate().any(|(d, (a, b))| d != dim && b > a) {
            return Err(self.err("gather", format!("index {is:?} is larger than {xs:?} off dimension {dim}")));
        }
        Ok(self.push(Op::Gather { dim }, vec![x, index], vec![], is))
    }

    /// `x <cmp> s`: a boolean tensor.
    pub fn compare_scalar(&mut self, x: ValueId, cmp: crate::graph::Cmp, s: f64) -> ValueId {
        let shape = self.shape(x).to_vec();
        self.push_typed(Op::CompareScalar { cmp, s }, vec![x], vec![], shape, DType::Bool)
    }

    /// `F.mse_loss(x, target)`, mean over every element.
    pub fn mse_loss(&mut self, x: ValueId, target: ValueId) -> R<ValueId> {
        if self.shape(x) != self.shape(target) {
            return Err(
                self.err("mse_loss", format!("target {:?} is not shaped like {:?}", self.shape(target), self.shape(x)))
            );
        }
        Ok(self.push(Op::MseLoss, vec![x, target], vec![], vec![]))
    }

    fn reduced(shape: &[u64], dims: &[usize], keepdim: bool) -> Shape {
        shape
            .iter()
            .enumerate()
            .filter_map(|(i, &d)| if dims.contains(&i) { keepdim.then_some(1) } else { Some(d) })
            .collect()
    }

    pub fn mean(&mut self, x: ValueId, dims: Vec<usize>, keepdim: bool) -> ValueId {
        let o = Builder::reduced(self.shape(x), &dims, keepdim);
        self.push(Op::Mean { dims, keepdim }, vec![x], vec![], o)
    }

    pub fn sum(&mut self, x: ValueId, dims: Vec<usize>, keepdim: bool) -> ValueId {
        let o = Builder::reduced(self.shape(x), &dims, keepdim);
        self.push(Op::Sum { dims, keepdim }, vec![x], vec![], o)
    }

    /// All dimensions of a value, for full reductions.
    pub fn all_dims(&self, x: ValueId) -> Vec<usize> {
        (0..self.shape(x).len()).collect()
    }

    /// `F.normalize(x, dim=-1)`: `x / max(||x||, 1e-12)`.
    pub fn normalize(&mut self, x: ValueId) -> R<ValueId> {
        let mut s = self.shape(x).to_vec();
        if let Some(last) = s.last_mut() {
            *last = 1;
        }
        let n = self.push(Op::VectorNorm, vec![x], vec![], s.clone());
        let n = self.unary(Op::ClampMin { min: 1e-12 }, n);
        let full = self.shape(x).to_vec();
        let n = self.expand(n, full)?;
        self.div(x, n)
    }

    pub fn softmax(&mut self, x: ValueId, dim: usize) -> ValueId {
        self.unary(Op::Softmax { dim }, x)
    }

    pub fn log_softmax(&mut self, x: ValueId, dim: usize) -> ValueId {
        self.unary(Op::LogSoftmax { dim }, x)
    }

    pub fn argmax(&mut self, x: ValueId) -> ValueId {
        let mut s = self.shape(x).to_vec();
        s.pop();
        self.push_typed(Op::Argmax, vec![x], vec![], s, DType::I64)
    }

    pub fn view(&mut self, x: ValueId, shape: Shape) -> R<ValueId> {
        if numel(&shape) != numel(self.shape(x)) {
            return Err(self.err("view", format!("cannot view {:?} as {shape:?}", self.shape(x))));
        }
        Ok(self.push(Op::View { shape: shape.clone() }, vec![x], vec![], shape))
    }

    pub fn reshape(&mut self, x: ValueId, shape: Shape) -> R<ValueId> {
        if numel(&shape) != numel(self.shape(x)) {
            return Err(self.err("reshape", format!("cannot reshape {:?} to {shape:?}", self.shape(x))));
        }
        Ok(self.push(Op::Reshape { shape: shape.clone() }, vec![x], vec![], shape))
    }

    pub fn permute(&mut self, x: ValueId, dims: Vec<usize>) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let mut sorted = dims.clone();
        sorted.sort_unstable();
        if sorted != (0..shape.len()).collect::<Vec<_>>() {
            return Err(self.err("permute", format!("{dims:?} is not a permutation of {} dims", shape.len())));
        }
        let o = dims.iter().map(|&d| shape[d]).collect();
        Ok(self.push(Op::Permute { dims }, vec![x], vec![], o))
    }

    pub fn transpose(&mut self, x: ValueId, d0: usize, d1: usize) -> ValueId {
        let mut shape = self.shape(x).to_vec();
        shape.swap(d0, d1);
        self.push(Op::Transpose { d0, d1 }, vec![x], vec![], shape)
    }

    pub fn unsqueeze(&mut self, x: ValueId, dim: usize) -> ValueId {
        let mut shape = self.shape(x).to_vec();
        shape.insert(dim, 1);
        self.push(Op::Unsqueeze { dim }, vec![x], vec![], shape)
    }

    pub fn squeeze(&mut self, x: ValueId, dim: usize) -> ValueId {
        let mut shape = self.shape(x).to_vec();
        if shape.get(dim) == Some(&1) {
            shape.remove(dim);
        }
        self.push(Op::Squeeze { dim }, vec![x], vec![], shape)
    }

    pub fn expand(&mut self, x: ValueId, shape: Shape) -> R<ValueId> {
        if broadcast(self.shape(x), &shape).as_deref() != Some(shape.as_slice()) {
            return Err(self.err("expand", format!("cannot expand {:?} to {shape:?}", self.shape(x))));
        }
        Ok(self.push(Op::Expand { shape: shape.clone() }, vec![x], vec![], shape))
    }

    pub fn contiguous(&mut self, x: ValueId) -> ValueId {
        self.unary(Op::Contiguous, x)
    }

    pub fn clone_value(&mut self, x: ValueId) -> ValueId {
        self.unary(Op::Clone, x)
    }

    /// A permute followed by `.contiguous()`.
    pub fn permute_copy(&mut self, x: ValueId, dims: Vec<usize>) -> R<ValueId> {
        let p = self.permute(x, dims)?;
        Ok(self.contiguous(p))
    }

    pub fn select(&mut self, x: ValueId, dim: usize, index: u64) -> ValueId {
        let mut shape = self.shape(x).to_vec();
        shape.remove(dim);
        self.push(Op::Select { dim, index }, vec![x], vec![], shape)
    }

    pub fn slice(&mut self, x: ValueId, dim: usize, start: u64, len: u64, step: u64) -> ValueId {
        let mut shape = self.shape(x).to_vec();
        shape[dim] = len;
        self.push(Op::Slice { dim, start, len, step }, vec![x], vec![], shape)
    }

    /// `x.split(size, dim)`: equal pieces (the last may be shorter).
    pub fn split(&mut self, x: ValueId, dim: usize, size: u64) -> R<Vec<ValueId>> {
        let shape = self.shape(x).to_vec();
        if size == 0 || dim >= shape.len() {
            return Err(self.err("split", format!("cannot split {shape:?} into pieces of {size} along {dim}")));
        }
        let grad = self.g.values[x].requires_grad;
        let dtype = self.g.values[x].dtype;
        let mut outs = Vec::new();
        let mut at = 0;
        while at < shape[dim] {
            let mut s = shape.clone();
            s[dim] = size.min(shape[dim] - at);
            outs.push(self.value(s, dtype, grad));
            at += size;
        }
        self.g.nodes.push(Node { op: Op::Split { dim, size }, inputs: vec![x], params: vec![], outputs: outs.clone() });
        Ok(outs)
    }

    /// `F.pad(x, ...)` with zeros, `(before, after)` for each of the last dimensions.
    pub fn pad(&mut self, x: ValueId, pads: Vec<(u64, u64)>) -> ValueId {
        let mut shape = self.shape(x).to_vec();
        let mut full = vec![(0, 0); shape.len()];
        let off = shape.len().saturating_sub(pads.len());
        for (i, p) in pads.into_iter().enumerate() {
            full[off + i] = p;
            shape[off + i] += p.0 + p.1;
        }
        self.push(Op::Pad { pads: full }, vec![x], vec![], shape)
    }

    pub fn roll(&mut self, x: ValueId, shifts: Vec<i64>, dims: Vec<usize>) -> ValueId {
        let shape = self.shape(x).to_vec();
        self.push(Op::Roll { shifts, dims }, vec![x], vec![], shape)
    }

    /// `table[ids]` with an embedding table parameter.
    pub fn embedding(&mut self, name: &str, ids: ValueId, rows: u64, dim: u64) -> ValueId {
        let p = self.scope(name, |b| b.param("weight", vec![rows, dim], Init::Normal(1.0)));
        let t = self.param_value(p);
        self.embedding_with(ids, t)
    }

    /// An embedding lookup into a table value (`[rows, dim]`).
    pub fn embedding_with(&mut self, ids: ValueId, table: ValueId) -> ValueId {
        let mut shape = self.shape(ids).to_vec();
        shape.push(self.shape(table)[1]);
        self.push_typed(Op::Embedding, vec![table, ids], vec![], shape, DType::F32)
    }

    /// `x[arange(B), idx]`.
    pub fn index_rows(&mut self, x: ValueId, idx: ValueId) -> R<ValueId> {
        let s = self.shape(x).to_vec();
        if s.len() != 3 || self.shape(idx) != [s[0]] {
            return Err(self.err("index", format!("needs [B, T, D] and [B] indices, got {s:?}")));
        }
        Ok(self.push_typed(Op::IndexRows, vec![x, idx], vec![], vec![s[0], s[2]], DType::F32))
    }

    /// `x[idx]` for a 1-D int64 index.
    pub fn index(&mut self, x: ValueId, idx: ValueId) -> ValueId {
        let mut s = self.shape(x).to_vec();
        s[0] = self.shape(idx)[0];
        let dtype = self.dtype(x);
        self.push_typed(Op::Index, vec![x, idx], vec![], s, dtype)
    }

    /// `torch.matmul(a, b)` for 2-D or batched operands.
    pub fn matmul(&mut self, a: ValueId, b: ValueId) -> R<ValueId> {
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        if sa.len() < 2 || sb.len() < 2 || sa[sa.len() - 1] != sb[sb.len() - 2] {
            return Err(self.err("matmul", format!("cannot multiply {sa:?} by {sb:?}")));
        }
        let batch = broadcast(&sa[..sa.len() - 2], &sb[..sb.len() - 2])
            .ok_or_else(|| self.err("matmul", format!("batch dimensions of {sa:?} and {sb:?} do not broadcast")))?;
        let mut o = batch;
        o.extend([sa[sa.len() - 2], sb[sb.len() - 1]]);
        Ok(self.push(Op::MatMul, vec![a, b], vec![], o))
    }

    /// Scaled dot-product attention over `[B, H, N, hd]` queries and `[B, H, S, hd]` keys
    /// and values, with an optional additive mask that broadcasts to `[B, H, N, S]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        q: ValueId,
        k: ValueId,
        v: ValueId,
        mask: Option<ValueId>,
        causal: bool,
        dropout: f64,
        scale: Option<f64>,
    ) -> R<ValueId> {
        let (sq, sk, sv) = (self.shape(q).to_vec(), self.shape(k).to_vec(), self.shape(v).to_vec());
        if sq.len() != 4 || sk.len() != 4 || sk != sv || sq[..2] != sk[..2] || sq[3] != sk[3] {
            return Err(self.err("attention", format!("q {sq:?}, k {sk:?}, v {sv:?} are not [B, H, N, hd]")));
        }
        let mut inputs = vec![q, k, v];
        if let Some(m) = mask {
            if broadcast(self.shape(m), &[sq[0], sq[1], sq[2], sk[2]]).as_deref() != Some(&[sq[0], sq[1], sq[2], sk[2]])
            {
                return Err(self.err("attention", format!("mask {:?} does not broadcast to the scores", self.shape(m))));
            }
            inputs.push(m);
        }
        Ok(self.push(Op::Attention { causal, dropout, scale }, inputs, vec![], sq))
    }

    /// `nn.Dropout(p)`; a no-op for `p = 0`, as in PyTorch.
    pub fn dropout(&mut self, x: ValueId, p: f64) -> ValueId {
        if p <= 0.0 {
            return x;
        }
        self.unary(Op::Dropout { p, inplace: false }, x)
    }

    /// Swin's attention mask for shifted windows, made by this forward pass.
    pub fn shifted_window_mask(&mut self, padded: [u64; 3], window: [u64; 3], shift: [u64; 3]) -> ValueId {
        let windows = (0..3).map(|i| padded[i] / window[i].max(1)).product::<u64>();
        let n = window.iter().product::<u64>();
        let v = self.value(vec![windows, n, n], DType::F32, false);
        self.g.nodes.push(Node {
            op: Op::ShiftedWindowMask { padded, window, shift },
            inputs: vec![],
            params: vec![],
            outputs: vec![v],
        });
        v
    }

    /// `x.to(like.dtype)`.
    pub fn cast_like(&mut self, x: ValueId, like: ValueId) -> ValueId {
        let shape = self.shape(x).to_vec();
        let dtype = self.dtype(x);
        self.push_typed(Op::CastLike, vec![x, like], vec![], shape, dtype)
    }

    pub fn to_f32(&mut self, x: ValueId) -> ValueId {
        self.unary(Op::ToF32, x)
    }

    pub fn to_i64(&mut self, x: ValueId) -> ValueId {
        let shape = self.shape(x).to_vec();
        self.push_typed(Op::ToI64, vec![x], vec![], shape, DType::I64)
    }

    /// `nll_loss` (mean) of log-probabilities `[N, C, ...]` against int64 targets `[N, ...]`.
    pub fn nll_loss(&mut self, log_probs: ValueId, target: ValueId, ignore_index: i64) -> R<ValueId> {
        let (s, t) = (self.shape(log_probs).to_vec(), self.shape(target).to_vec());
        let mut want = s.clone();
        if want.len() > 1 {
            want.remove(1);
        }
        if t != want || self.dtype(target) != DType::I64 {
            return Err(self.err("nll_loss", format!("targets {t:?} do not match log-probabilities {s:?}")));
        }
        Ok(self.push_typed(Op::NllLoss { ignore_index }, vec![log_probs, target], vec![], vec![], DType::F32))
    }

    pub fn bce_with_logits(&mut self, logits: ValueId, target: ValueId) -> R<ValueId> {
        if self.shape(logits) != self.shape(target) {
            return Err(self.err(
                "bce_with_logits",
                format!("targets {:?} do not match logits {:?}", self.shape(target), self.shape(logits)),
            ));
        }
        Ok(self.push_typed(Op::BceWithLogits, vec![logits, target], vec![], vec![], DType::F32))
    }

    pub fn one_hot(&mut self, labels: ValueId, classes: u64) -> ValueId {
        let mut s = self.shape(labels).to_vec();
        if s.len() > 1 {
            s[1] = classes;
        }
        self.push_typed(Op::OneHot { classes }, vec![labels], vec![], s, DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (Builder, ValueId) {
        let mut b = Builder::new(Task::Classify { classes: 10 });
        let x = b.input(vec![2, 1024], InputKind::Real);
        (b, x)
    }

    #[test]
    fn linear_counts_weights_and_biases_and_infers_shapes() {
        let (mut b, x) = tiny();
        let h = b.linear("fc1", x, 4096, true).expect("fc1");
        let o = b.linear("fc2", h, 10, false).expect("fc2");
        let y = b.input(vec![2], InputKind::ClassIndex { classes: 10 });
        let start = b.next_node();
        let lp = b.log_softmax(o, 1);
        let loss = b.nll_loss(lp, y, -100).expect("loss");
        let g = b.finish(vec![o], loss, start);
        assert_eq!(g.n_params(), 1024 * 4096 + 4096 + 4096 * 10);
        assert_eq!(g.values[o].shape, vec![2, 10]);
        assert_eq!(g.params[2].name, "fc2.weight");
        assert!(g.values[g.loss].shape.is_empty() && g.values[g.loss].requires_grad);
        assert!(!g.values[y].requires_grad, "labels need no gradient");
    }

    #[test]
    fn conv_and_pool_infer_shapes() {
        let mut b = Builder::new(Task::Classify { classes: 10 });
        let x = b.input(vec![1, 3, 32, 32], InputKind::Real);
        let c = b.conv("conv", x, 16, 3, 2, 1, 1, true).expect("conv");
        let p = b.max_pool(c, 2, 2, 0).expect("pool");
        assert_eq!(b.shape(p), &[1, 16, 8, 8]);
        let t = b.conv_transpose("up", p, 4, 3, 2, 1, 1, false).expect("up");
        assert_eq!(b.shape(t), &[1, 4, 16, 16]);
    }

    #[test]
    fn shape_errors_name_the_module() {
        let mut b = Builder::new(Task::Classify { classes: 10 });
        let x = b.input(vec![1, 3, 4, 4], InputKind::Real);
        let err = b.scope("stem", |b| b.conv("conv1", x, 8, 7, 1, 0, 1, false)).expect_err("too small");
        assert_eq!(err.to_string(), "conv (stem.conv1): kernel 7 does not fit a size of 4 with padding 0");
        let err = b.conv("grouped", x, 8, 3, 1, 1, 2, false).expect_err("groups");
        assert!(err.to_string().contains("2 groups must divide 3"), "{err}");
        let y = b.input(vec![1, 5], InputKind::Real);
        let err = b.add(x, y).expect_err("broadcast");
        assert!(err.to_string().contains("cannot broadcast"), "{err}");
    }

    #[test]
    fn broadcasting_follows_pytorch() {
        assert_eq!(broadcast(&[2, 1, 4], &[3, 1]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast(&[5], &[]), Some(vec![5]));
        assert_eq!(broadcast(&[2, 3], &[4]), None);
    }

    #[test]
    fn checkpoint_regions_follow_checkpoint_sequential_and_blocks() {
        let mut b = Builder::new(Task::Classify { classes: 2 });
        let mut x = b.input(vec![1, 4], InputKind::Real);
        for i in 0..4 {
            x = b.stage(|b| b.block(|b| b.linear(&format!("l{i}"), x, 4, true))).expect("layer");
        }
        let y = b.input(vec![1], InputKind::ClassIndex { classes: 2 });
        let start = b.next_node();
        let lp = b.log_softmax(x, 1);
        let loss = b.nll_loss(lp, y, -100).expect("loss");
        let g = b.finish(vec![x], loss, start);
        let n = g.nodes.len();
        // Each linear is three nodes (weight, bias, linear).
        assert_eq!(g.regions(Checkpoint::Off), vec![Region { nodes: 0..n, checkpointed: false }]);
        let seg = g.regions(Checkpoint::Segments(2));
        assert_eq!(
            seg,
            vec![Region { nodes: 0..6, checkpointed: true }, Region { nodes: 6..n, checkpointed: false }],
            "two segments: the first two stages checkpointed, the rest run normally"
        );
        assert_eq!(g.regions(Checkpoint::Segments(5)).len(), 1, "more segments than stages is refused by validation");
        let blocks = g.regions(Checkpoint::Blocks);
        assert_eq!(blocks.iter().filter(|r| r.checkpointed).count(), 4);
        assert_eq!(blocks.last().map(|r| r.checkpointed), Some(false), "the loss is never checkpointed");
    }
}
