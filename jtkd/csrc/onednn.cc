// oneDNN for XLA:CPU through the XLA FFI: convolutions (forward, input
// gradient and weight gradient on NHWC activations and HWIO kernels, Flax's
// layouts) and batched matmuls with transposed operands read in place; built
// with JTKD_WITH_MKL, also the same matmul by MKL's sgemm.
//
// XLA:CPU's own convolutions are 1.2-1.3x slower than oneDNN's on ResNet
// shapes, and its weight gradients need transposed copies of the activations
// (bench/FINDINGS.md). oneDNN reads both layouts in place; only the (small)
// kernel is reordered into the blocked format its kernels want.
#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"
#ifdef JTKD_WITH_MKL
#include <omp.h>
#include <xmmintrin.h>

#include "mkl.h"
#endif

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum class Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// oneDNN's argument keys for the activation, kernel and output-side buffers of each Kind.
struct ArgKeys {
  int src, wei, dst;
};
constexpr ArgKeys kArgKeys[] = {
    {DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST},            // kForward
    {DNNL_ARG_DIFF_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_DST},  // kBackwardData
    {DNNL_ARG_SRC, DNNL_ARG_DIFF_WEIGHTS, DNNL_ARG_DIFF_DST},  // kBackwardWeights
};

struct Geometry {
  memory::dims src, wei, dst;  // logical oneDNN dims (N C H W / [G] O I H W)
  memory::dims wei_strides;    // HWIO (grouped: H W I G O) as strides
  memory::dims strides, dilates, pad_l, pad_r;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Primitives for one convolution geometry, built once and shared: oneDNN
// primitives are immutable and safe to execute from several threads at once.
struct Entry {
  dnnl::primitive prim;
  memory::desc src_md, wei_md, dst_md;  // what `prim` expects
  memory::desc user_wei_md;             // HWIO as XLA stores it
  memory::desc scratch_md, reorder_scratch_md;
  bool reorder_wei = false;
  dnnl::reorder wei_reorder;            // HWIO -> prim's format, or back
  std::string impl;
};

std::string Key(Kind kind, const Geometry& g) {
  std::string key = std::to_string(static_cast<int>(kind));
  for (const auto* v : {&g.src, &g.wei, &g.dst, &g.strides, &g.dilates,
                        &g.pad_l, &g.pad_r}) {
    key += '|';
    for (auto d : *v) key += std::to_string(d) + ',';
  }
  return key;
}

std::shared_ptr<Entry> Build(Kind kind, const Geometry& g) {
  auto& eng = Engine();
  const auto f32 = memory::data_type::f32;
  memory::desc src_md(g.src, f32, tag::nhwc);
  memory::desc dst_md(g.dst, f32, tag::nhwc);
  memory::desc any_wei(g.wei, f32, tag::any);
  auto e = std::make_shared<Entry>();
  e->user_wei_md = memory::desc(g.wei, f32, g.wei_strides);
  const auto algo = dnnl::algorithm::convolution_direct;
  // XLA runs independent operations concurrently: oneDNN's shared (library)
  // scratchpad is not safe for that, so every call brings its own.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::primitive_desc fwd(
      eng, dnnl::prop_kind::forward_training, algo, src_md, any_wei, dst_md,
      g.strides, g.dilates, g.pad_l, g.pad_r, attr);
  if (kind == Kind::kForward) {
    e->prim = dnnl::convolution_forward(fwd);
    e->wei_md = fwd.weights_desc();
    e->scratch_md = fwd.scratchpad_desc();
    e->impl = fwd.impl_info_str();
  } else if (kind == Kind::kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        eng, algo, src_md, any_wei, dst_md, g.strides, g.dilates, g.pad_l,
        g.pad_r, fwd, attr);
    e->prim = dnnl::convolution_backward_data(pd);
    e->wei_md = pd.weights_desc();
    e->scratch_md = pd.scratchpad_desc();
    e->impl = pd.impl_info_str();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        eng, algo, src_md, any_wei, dst_md, g.strides, g.dilates, g.pad_l,
        g.pad_r, fwd, attr);
    e->prim = dnnl::convolution_backward_weights(pd);
    e->wei_md = pd.diff_weights_desc();
    e->scratch_md = pd.scratchpad_desc();
    e->impl = pd.impl_info_str();
  }
  e->src_md = src_md;
  e->dst_md = dst_md;
  e->reorder_wei = e->wei_md != e->user_wei_md;
  if (e->reorder_wei) {
    auto pd = kind == Kind::kBackwardWeights
                  ? dnnl::reorder::primitive_desc(eng, e->wei_md, eng,
                                                  e->user_wei_md, attr)
                  : dnnl::reorder::primitive_desc(eng, e->user_wei_md, eng,
                                                  e->wei_md, attr);
    e->wei_reorder = dnnl::reorder(pd);
    e->reorder_scratch_md = pd.scratchpad_desc();
  }
  return e;
}

// Primitives are built once per key and shared (building JITs kernels, so it
// runs outside the lock; a race builds twice and keeps the first).
template <typename T, typename Build>
std::shared_ptr<T> Cached(const std::string& key, Build build) {
  static std::mutex mu;
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<T>>();
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  std::shared_ptr<T> e = build();
  std::lock_guard<std::mutex> lock(mu);
  return cache->emplace(key, e).first->second;
}

std::shared_ptr<Entry> Get(Kind kind, const Geometry& g) {
  return Cached<Entry>(Key(kind, g), [&] { return Build(kind, g); });
}

// x: N H W C, kernel: KH KW C/G O, y: N OH OW O.
ffi::ErrorOr<Geometry> MakeGeometry(ffi::Span<const int64_t> x,
                                    ffi::Span<const int64_t> k,
                                    ffi::Span<const int64_t> y,
                                    ffi::Span<const int64_t> strides,
                                    ffi::Span<const int64_t> pad_lo,
                                    ffi::Span<const int64_t> pad_hi,
                                    ffi::Span<const int64_t> dilation,
                                    int64_t groups) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4 || strides.size() != 2 ||
      pad_lo.size() != 2 || pad_hi.size() != 2 || dilation.size() != 2) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "jtkd oneDNN convolution: expected 2-D NHWC/HWIO operands and "
        "2-element strides, padding and dilation"));
  }
  const int64_t c = x[3], o = k[3], ci = k[2];
  if (groups < 1 || c != ci * groups || o % groups != 0 || y[3] != o ||
      x[0] != y[0]) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "jtkd oneDNN convolution: operand shapes do not match the groups"));
  }
  Geometry g;
  g.src = {x[0], c, x[1], x[2]};
  g.dst = {y[0], o, y[1], y[2]};
  const int64_t kh = k[0], kw = k[1];
  if (groups == 1) {
    g.wei = {o, ci, kh, kw};
    g.wei_strides = {1, o, kw * ci * o, ci * o};
  } else {
    const int64_t og = o / groups;
    g.wei = {groups, og, ci, kh, kw};
    g.wei_strides = {og, 1, o, kw * ci * o, ci * o};
  }
  g.strides = {strides[0], strides[1]};
  g.dilates = {dilation[0] - 1, dilation[1] - 1};  // oneDNN counts the gaps
  g.pad_l = {pad_lo[0], pad_lo[1]};
  g.pad_r = {pad_hi[0], pad_hi[1]};
  return g;
}

ffi::Error Run(Kind kind, const Geometry& g, float* src, float* wei,
               float* dst) {
  try {
    auto e = Get(kind, g);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    memory src_m(e->src_md, eng, src), dst_m(e->dst_md, eng, dst);
    memory user_wei(e->user_wei_md, eng, wei);
    memory wei_m = e->reorder_wei ? memory(e->wei_md, eng) : user_wei;
    memory scratch(e->scratch_md, eng);
    auto reorder = [&](memory& from, memory& to) {
      memory reorder_scratch(e->reorder_scratch_md, eng);
      e->wei_reorder.execute(stream, {{DNNL_ARG_FROM, from},
                                      {DNNL_ARG_TO, to},
                                      {DNNL_ARG_SCRATCHPAD, reorder_scratch}});
    };
    if (e->reorder_wei && kind != Kind::kBackwardWeights) {
      reorder(user_wei, wei_m);
    }
    const ArgKeys& keys = kArgKeys[static_cast<int>(kind)];
    e->prim.execute(stream, {{keys.src, src_m},
                             {keys.wei, wei_m},
                             {keys.dst, dst_m},
                             {DNNL_ARG_SCRATCHPAD, scratch}});
    if (e->reorder_wei && kind == Kind::kBackwardWeights) {
      reorder(wei_m, user_wei);
    }
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("jtkd oneDNN convolution: ") +
                                err.what());
  }
  return ffi::Error::Success();
}

#define JTKD_ATTRS                                        \
  ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo, \
      ffi::Span<const int64_t> pad_hi, ffi::Span<const int64_t> dilation, \
      int64_t groups

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, JTKD_ATTRS) {
  auto g = MakeGeometry(x.dimensions(), k.dimensions(), y->dimensions(),
                        strides, pad_lo, pad_hi, dilation, groups);
  if (g.has_error()) return g.error();
  return Run(Kind::kForward, *g, x.typed_data(), k.typed_data(),
             y->typed_data());
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                        ffi::ResultBuffer<ffi::F32> dx, JTKD_ATTRS) {
  auto g = MakeGeometry(dx->dimensions(), k.dimensions(), dy.dimensions(),
                        strides, pad_lo, pad_hi, dilation, groups);
  if (g.has_error()) return g.error();
  return Run(Kind::kBackwardData, *g, dx->typed_data(), k.typed_data(),
             dy.typed_data());
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dk, JTKD_ATTRS) {
  auto g = MakeGeometry(x.dimensions(), dk->dimensions(), dy.dimensions(),
                        strides, pad_lo, pad_hi, dilation, groups);
  if (g.has_error()) return g.error();
  return Run(Kind::kBackwardWeights, *g, x.typed_data(), dk->typed_data(),
             dy.typed_data());
}

// Batched matmul C[b] = op(A[b]) op(B[b]), op = transpose or not, read in
// place through strides. XLA:CPU runs small batched dots (attention: 48 x
// 197x64x197) at about half of oneDNN's speed, and copies a transposed operand
// first (bench/FINDINGS.md).
struct MatmulEntry {
  dnnl::matmul prim;
  memory::desc a_md, b_md, c_md, scratch_md;
  std::string impl;
};

// a: batch x rows x cols as stored; `trans` says the logical operand is its transpose.
memory::desc OperandDesc(int64_t batch, int64_t rows, int64_t cols, bool trans) {
  const auto f32 = memory::data_type::f32;
  if (!trans) return memory::desc({batch, rows, cols}, f32, {rows * cols, cols, 1});
  return memory::desc({batch, cols, rows}, f32, {rows * cols, 1, cols});
}

std::shared_ptr<MatmulEntry> GetMatmul(int64_t batch, int64_t a_rows, int64_t a_cols,
                                       int64_t b_rows, int64_t b_cols, bool ta, bool tb) {
  std::string key;
  for (int64_t v : {batch, a_rows, a_cols, b_rows, b_cols, int64_t{ta}, int64_t{tb}})
    key += std::to_string(v) + ',';
  return Cached<MatmulEntry>(key, [&] {
    auto e = std::make_shared<MatmulEntry>();
    e->a_md = OperandDesc(batch, a_rows, a_cols, ta);
    e->b_md = OperandDesc(batch, b_rows, b_cols, tb);
    const int64_t m = ta ? a_cols : a_rows, n = tb ? b_rows : b_cols;
    e->c_md = memory::desc({batch, m, n}, memory::data_type::f32, {m * n, n, 1});
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // see Build()
    dnnl::matmul::primitive_desc pd(Engine(), e->a_md, e->b_md, e->c_md, attr);
    e->prim = dnnl::matmul(pd);
    e->scratch_md = pd.scratchpad_desc();
    e->impl = pd.impl_info_str();
    return e;
  });
}

// Dimensions as batch x rows x cols; a rank-2 buffer is one matrix. Accepting
// rank 2 spares XLA a reshape between a linear layer's input and its saved
// residual, which it would otherwise meet by computing the input twice.
std::array<int64_t, 3> BatchDims(ffi::Span<const int64_t> d) {
  if (d.size() == 2) return {1, d[0], d[1]};
  if (d.size() == 3) return {d[0], d[1], d[2]};
  return {-1, -1, -1};
}

// The operands' [batch x] rows x cols as stored, if they and the result fit
// c = op(a) @ op(b).
std::optional<std::array<std::array<int64_t, 3>, 2>> MatmulDims(
    ffi::Span<const int64_t> a, ffi::Span<const int64_t> b,
    ffi::Span<const int64_t> c, bool transpose_a, bool transpose_b) {
  const auto ad = BatchDims(a), bd = BatchDims(b), cd = BatchDims(c);
  if (ad[0] < 0 || bd[0] < 0 || cd[0] < 0 || ad[0] != bd[0] ||
      (transpose_a ? ad[1] : ad[2]) != (transpose_b ? bd[2] : bd[1]) ||
      cd[0] != ad[0] || cd[1] != (transpose_a ? ad[2] : ad[1]) ||
      cd[2] != (transpose_b ? bd[1] : bd[2])) {
    return std::nullopt;
  }
  return std::array<std::array<int64_t, 3>, 2>{ad, bd};
}

ffi::Error BadMatmulShapes() {
  return ffi::Error::InvalidArgument(
      "jtkd matmul: expected [batch x] m x k, [batch x] k x n operands");
}

ffi::Error Matmul(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  const auto dims = MatmulDims(a.dimensions(), b.dimensions(), c->dimensions(), transpose_a, transpose_b);
  if (!dims) return BadMatmulShapes();
  const auto& [ad, bd] = *dims;
  try {
    auto e = GetMatmul(ad[0], ad[1], ad[2], bd[1], bd[2], transpose_a, transpose_b);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    memory am(e->a_md, eng, a.typed_data()), bm(e->b_md, eng, b.typed_data());
    memory cm(e->c_md, eng, c->typed_data()), scratch(e->scratch_md, eng);
    e->prim.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm},
                             {DNNL_ARG_DST, cm}, {DNNL_ARG_SCRATCHPAD, scratch}});
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("jtkd oneDNN matmul: ") + err.what());
  }
  return ffi::Error::Success();
}

#ifdef JTKD_WITH_MKL
// The same product by MKL's sgemm, row-major, transposed operands read in
// place. With AVX-512, oneDNN's matmul (brgemm) runs wide outputs at about
// half of MKL's speed: x @ w at 788x768 @ 768x3072, 2 cores, oneDNN 26.6 ms,
// MKL 12.2 ms, XLA 14.6 ms (bench/FINDINGS.md).
ffi::Error MklMatmul(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                     ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  const auto dims = MatmulDims(a.dimensions(), b.dimensions(), c->dimensions(), transpose_a, transpose_b);
  if (!dims) return BadMatmulShapes();
  const auto& [ad, bd] = *dims;
  const int64_t m = transpose_a ? ad[2] : ad[1], k = transpose_a ? ad[1] : ad[2],
                n = transpose_b ? bd[1] : bd[2];
  const auto op = [](bool t) { return t ? CblasTrans : CblasNoTrans; };
  // Leading dimensions are the stored row lengths whether or not an operand is transposed.
  cblas_sgemm_batch_strided(CblasRowMajor, op(transpose_a), op(transpose_b), m, n, k, 1.0f,
                            a.typed_data(), ad[2], ad[1] * ad[2], b.typed_data(), bd[2],
                            bd[1] * bd[2], 0.0f, c->typed_data(), n, m * n, ad[0]);
  return ffi::Error::Success();
}

// Self-attention over a packed (batch, tokens, 3 x heads x head_dim) q|k|v
// tensor, as torch's in_proj writes it, one (batch, head) at a time: the
// scores, softmax and products of one head stay in cache, and q, k, v and the
// output are read and written in place through their row strides, where
// XLA needs transposed copies of q, k, v and of the output, and the scores
// make a round trip through memory between each step (bench/FINDINGS.md).
// An additive bias (groups, heads, tokens, tokens) joins the scores before the
// softmax, batch element b taking group b % groups (Swin's shifted-window
// masks and relative position biases); zero groups is none.
struct AttentionDims {
  int64_t batch, tokens, heads, head_dim, groups;
  int64_t width() const { return heads * head_dim; }  // one of q, k, v per token
  int64_t matrix() const { return tokens * tokens; }
};

bool HasDims(ffi::Span<const int64_t> d, std::initializer_list<int64_t> want) {
  return d.size() == want.size() && std::equal(want.begin(), want.end(), d.begin());
}

std::optional<AttentionDims> GetAttentionDims(ffi::Span<const int64_t> qkv,
                                              ffi::Span<const int64_t> bias, int64_t heads) {
  if (qkv.size() != 3 || bias.size() != 4 || heads < 1 || qkv[2] % (3 * heads) != 0) {
    return std::nullopt;
  }
  const AttentionDims a{qkv[0], qkv[1], heads, qkv[2] / (3 * heads), bias[0]};
  if (!HasDims(bias, {a.groups, heads, a.tokens, a.tokens}) ||
      (a.groups > 0 && a.batch % a.groups != 0)) {
    return std::nullopt;
  }
  return a;
}

ffi::Error BadAttentionShapes() {
  return ffi::Error::InvalidArgument(
      "jtkd attention: expected qkv (batch, tokens, 3 x heads x head_dim), bias (groups, heads, "
      "tokens, tokens) with groups dividing batch, out (batch, tokens, heads x head_dim), probs "
      "(batch, heads, tokens, tokens)");
}

// The row loops below are built for the CPU they run on: the library is
// compiled for baseline x86-64, whose 4-wide vectors made the softmax take as
// long as either of a head's products.
#define JTKD_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// VML's accurate exp. Arguments below kExpFloor take VML's slow path for
// underflow (Swin's masked scores, -100, made its attention 10x slower), so
// they are raised to it: exp(-87) = 1.6e-38 where the true value, at most
// 1.6e-38 too, is a denormal or 0, against a row sum of at least 1.
constexpr MKL_INT64 kExpMode = VML_HA | VML_FTZDAZ_ON | VML_ERRMODE_IGNORE;
constexpr float kExpFloor = -87.0f;

// Each row of the n x n s becomes softmax(row), in place.
JTKD_VECTOR_CLONES void SoftmaxRows(float* s, int64_t n) {
  for (int64_t r = 0; r < n; ++r) {
    float* row = s + r * n;
    float m = row[0];
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < n; ++c) m = row[c] > m ? row[c] : m;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) row[c] = std::max(row[c] - m, kExpFloor);
  }
  vmsExp(n * n, s, s, kExpMode);
  for (int64_t r = 0; r < n; ++r) {
    float* row = s + r * n;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < n; ++c) sum += row[c];
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) row[c] *= inv;
  }
}

// The softmax's gradient by rows, in place of the incoming gradient g:
// g = p * (g - sum(g * p)).
JTKD_VECTOR_CLONES void SoftmaxGradRows(const float* p, float* g, int64_t n) {
  for (int64_t r = 0; r < n; ++r) {
    const float* pr = p + r * n;
    float* gr = g + r * n;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < n; ++c) dot += gr[c] * pr[c];
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) gr[c] = pr[c] * (gr[c] - dot);
  }
}

JTKD_VECTOR_CLONES void AddTo(const float* x, float* y, int64_t size) {
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) y[i] += x[i];
}

// Runs body(task, scratch) for tasks 0..count-1, split over OpenMP threads
// with MKL sequential inside each; scratch is the thread's own `scratch_size` floats.
// Denormals are flushed to zero, as in XLA's own kernels: probabilities of
// masked scores can fall below float32's normal range, where every product
// with them takes the CPU's slow path.
template <typename F>
void ForEachTask(int64_t count, int64_t scratch_size, F body) {
#pragma omp parallel
  {
    const int saved = mkl_set_num_threads_local(1);
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  // flush-to-zero and denormals-are-zero
    std::vector<float> scratch(scratch_size);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < count; ++i) body(i, scratch.data());
    _mm_setcsr(csr);
    mkl_set_num_threads_local(saved);
  }
}

// out = softmax(scale q k^T + bias) v, the softmax by rows; it is kept in
// `probs` (batch, heads, tokens, tokens) for the gradient, or, with probs null
// (a forward pass only), in each thread's scratch.
ffi::Error AttentionForwardInto(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> bias,
                                ffi::ResultBuffer<ffi::F32>& out, float* probs,
                                ffi::Span<const int64_t> probs_dims, int64_t heads, float scale) {
  const auto dims = GetAttentionDims(qkv.dimensions(), bias.dimensions(), heads);
  if (!dims) return BadAttentionShapes();
  const AttentionDims a = *dims;
  const int64_t n = a.tokens, dh = a.head_dim, w = a.width(), ld = 3 * w, nn = a.matrix();
  if (!HasDims(out->dimensions(), {a.batch, n, w}) ||
      (probs && !HasDims(probs_dims, {a.batch, heads, n, n}))) {
    return BadAttentionShapes();
  }
  const float* x = qkv.typed_data();
  const float* b = bias.typed_data();
  float* o = out->typed_data();
  ForEachTask(a.batch * heads, probs ? 0 : nn, [&](int64_t i, float* scratch) {
    const int64_t bi = i / heads, hi = i % heads;
    const float* q = x + bi * n * ld + hi * dh;
    float* s = probs ? probs + i * nn : scratch;
    float beta = 0.0f;
    if (a.groups > 0) {
      std::copy_n(b + ((bi % a.groups) * heads + hi) * nn, nn, s);
      beta = 1.0f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, dh, scale, q, ld, q + w, ld, beta, s, n);
    SoftmaxRows(s, n);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, dh, n, 1.0f, s, n, q + 2 * w, ld, 0.0f,
                o + bi * n * w + hi * dh, w);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionForward(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> bias,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probs,
                            int64_t heads, float scale) {
  return AttentionForwardInto(qkv, bias, out, probs->typed_data(), probs->dimensions(), heads, scale);
}

ffi::Error AttentionInference(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> bias,
                              ffi::ResultBuffer<ffi::F32> out, int64_t heads, float scale) {
  return AttentionForwardInto(qkv, bias, out, nullptr, {}, heads, scale);
}

// With ds = probs * (dprobs - rowsum(dprobs * probs)), dprobs = dout v^T:
// dq = scale ds k, dk = scale ds^T q, dv = probs^T dout into a packed dqkv;
// where there is a bias, dbias[g] = the sum of ds over group g's batch
// elements, in batch order. ds goes through dscores (batch, heads, tokens,
// tokens), which the caller drops: summing in the first pass would serialise
// a group's elements (maxvit has one group), and XLA's sum over the leading
// axis of 4 is 25x slower than one pass here (bench/FINDINGS.md).
ffi::Error AttentionBackward(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> bias,
                             ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> dout,
                             ffi::ResultBuffer<ffi::F32> dqkv, ffi::ResultBuffer<ffi::F32> dbias,
                             ffi::ResultBuffer<ffi::F32> dscores, int64_t heads, float scale) {
  const auto dims = GetAttentionDims(qkv.dimensions(), bias.dimensions(), heads);
  if (!dims) return BadAttentionShapes();
  const AttentionDims a = *dims;
  const int64_t n = a.tokens, dh = a.head_dim, w = a.width(), ld = 3 * w, nn = a.matrix();
  if (!HasDims(dout.dimensions(), {a.batch, n, w}) ||
      !HasDims(probs.dimensions(), {a.batch, heads, n, n}) ||
      !HasDims(dqkv->dimensions(), {a.batch, n, ld}) ||
      !HasDims(dbias->dimensions(), {a.groups, heads, n, n}) ||
      !HasDims(dscores->dimensions(), {a.groups > 0 ? a.batch : 0, heads, n, n})) {
    return BadAttentionShapes();
  }
  const float* x = qkv.typed_data();
  const float* p = probs.typed_data();
  const float* g = dout.typed_data();
  float* dx = dqkv->typed_data();
  float* dsc = dscores->typed_data();
  ForEachTask(a.batch * heads, a.groups > 0 ? 0 : nn, [&](int64_t i, float* scratch) {
    const int64_t bi = i / heads, hi = i % heads;
    const float* q = x + bi * n * ld + hi * dh;
    const float* s = p + i * nn;
    const float* go = g + bi * n * w + hi * dh;
    float* dq = dx + bi * n * ld + hi * dh;
    float* ds = a.groups > 0 ? dsc + i * nn : scratch;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, dh, n, 1.0f, s, n, go, w, 0.0f, dq + 2 * w, ld);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, dh, 1.0f, go, w, q + 2 * w, ld, 0.0f, ds, n);
    SoftmaxGradRows(s, ds, n);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, dh, n, scale, ds, n, q + w, ld, 0.0f, dq, ld);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, dh, n, scale, ds, n, q, ld, 0.0f, dq + w, ld);
  });
  if (a.groups > 0) {
    // batch element bi = group + k * groups; one task per (group, head) row
    const int64_t stride = a.groups * heads * nn;
    float* db = dbias->typed_data();
    ForEachTask(a.groups * heads * n, 0, [&](int64_t r, float*) {
      const float* from = dsc + r * n;
      float* to = db + r * n;
      std::copy_n(from, n, to);
      for (int64_t k = 1; k < a.batch / a.groups; ++k) AddTo(from + k * stride, to, n);
    });
  }
  return ffi::Error::Success();
}
#endif

}  // namespace

// Every handler: two f32 operands, one f32 result, the convolution's geometry.
#define JTKD_DEFINE_HANDLER(symbol, fn)                                \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                       \
      symbol, fn,                                                      \
      ffi::Ffi::Bind()                                                 \
          .Arg<ffi::Buffer<ffi::F32>>()                                \
          .Arg<ffi::Buffer<ffi::F32>>()                                \
          .Ret<ffi::Buffer<ffi::F32>>()                                \
          .Attr<ffi::Span<const int64_t>>("strides")                   \
          .Attr<ffi::Span<const int64_t>>("pad_lo")                    \
          .Attr<ffi::Span<const int64_t>>("pad_hi")                    \
          .Attr<ffi::Span<const int64_t>>("dilation")                  \
          .Attr<int64_t>("groups"));

JTKD_DEFINE_HANDLER(JtkdOnednnConvForward, Forward)
JTKD_DEFINE_HANDLER(JtkdOnednnConvBackwardData, BackwardData)
JTKD_DEFINE_HANDLER(JtkdOnednnConvBackwardWeights, BackwardWeights)

// Every matmul handler: op(a) @ op(b), as `matmul` in jtkd/models/onednn.py.
#define JTKD_DEFINE_MATMUL_HANDLER(symbol, fn)                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, fn,                            \
                                ffi::Ffi::Bind()                       \
                                    .Arg<ffi::Buffer<ffi::F32>>()      \
                                    .Arg<ffi::Buffer<ffi::F32>>()      \
                                    .Ret<ffi::Buffer<ffi::F32>>()      \
                                    .Attr<bool>("transpose_a")         \
                                    .Attr<bool>("transpose_b"));

JTKD_DEFINE_MATMUL_HANDLER(JtkdOnednnMatmul, Matmul)
#ifdef JTKD_WITH_MKL
JTKD_DEFINE_MATMUL_HANDLER(JtkdMklMatmul, MklMatmul)
XLA_FFI_DEFINE_HANDLER_SYMBOL(JtkdMklAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // probs
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JtkdMklAttention, AttentionInference,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JtkdMklAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // probs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dqkv
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscores (scratch)
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));
#endif

namespace {
// Writes `impl()` (or the oneDNN error it throws) NUL-terminated into `out`;
// returns the length written.
template <typename F>
int64_t WriteImplInfo(F impl, char* out, int64_t out_size) {
  std::string s;
  try {
    s = impl();
  } catch (const dnnl::error& err) {
    s = std::string("error: ") + err.what();
  }
  const int64_t n = std::min<int64_t>(s.size(), out_size - 1);
  std::copy(s.begin(), s.begin() + n, out);
  out[n] = '\0';
  return n;
}
}  // namespace

// Which oneDNN implementation a geometry gets ("ref" would be slow): for
// tests and the bench. Returns the length written (without the NUL).
extern "C" int64_t JtkdOnednnImplInfo(int kind, const int64_t* x,
                                      const int64_t* k, const int64_t* y,
                                      const int64_t* attrs, int64_t groups,
                                      char* out, int64_t out_size) {
  auto span = [](const int64_t* p, size_t n) {
    return ffi::Span<const int64_t>(p, n);
  };
  auto g = MakeGeometry(span(x, 4), span(k, 4), span(y, 4), span(attrs, 2),
                        span(attrs + 2, 2), span(attrs + 4, 2),
                        span(attrs + 6, 2), groups);
  return WriteImplInfo(
      [&] {
        return g.has_error() ? std::string("error: invalid geometry")
                             : Get(static_cast<Kind>(kind), *g)->impl;
      },
      out, out_size);
}

// The same for a batched matmul.
extern "C" int64_t JtkdOnednnMatmulImplInfo(int64_t batch, int64_t a_rows,
                                            int64_t a_cols, int64_t b_rows,
                                            int64_t b_cols, int transpose_a,
                                            int transpose_b, char* out,
                                            int64_t out_size) {
  return WriteImplInfo(
      [&] {
        return GetMatmul(batch, a_rows, a_cols, b_rows, b_cols,
                         transpose_a != 0, transpose_b != 0)->impl;
      },
      out, out_size);
}
