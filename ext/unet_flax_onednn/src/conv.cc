// oneDNN convolutions (any KHxKW kernel, strides, explicit zero padding, channel groups) as XLA
// FFI handlers.
//
// Layouts as JAX passes them: activations NHWC, kernels HWIO (row-major, so XLA's default
// layouts). float32, or bfloat16 in/out with float32 accumulation; the weight gradient is always
// written as float32 (the Python side casts it to the kernel's dtype). A bfloat16 convolution
// also takes a float32 kernel (the parameters as a mixed-precision model stores them): oneDNN's
// reorder into the primitive's layout rounds it to bfloat16 (to nearest even, as XLA's convert),
// so no bfloat16 copy of the parameters is made in XLA. Every handler takes as
// attributes the padding pad_top, pad_bottom, pad_left, pad_right (>= 0), as
// lax.conv_general_dilated's padding ((pad_top, pad_bottom), (pad_left, pad_right)), the strides
// stride_h, stride_w (>= 1) and the channel groups `groups` (>= 1), as its window_strides and
// feature_group_count: the kernel is [KH, KW, C / groups, O], and output channel o sees the
// input channels of group o / (O / groups). The output is OH = (H + pad_top + pad_bottom - KH) /
// stride_h + 1 rows (rounded down; likewise OW). A depthwise convolution is groups = C = O.
//
//   unet_onednn_conv_fwd(x[N,H,W,C], w[KH,KW,C/G,O]) -> y[N,OH,OW,O]            (x's dtype)
//   unet_onednn_conv_bwd_data(dy[N,OH,OW,O], w[KH,KW,C/G,O]) -> dx[N,H,W,C]     (dy's dtype)
//   unet_onednn_conv_bwd_weights(x[N,H,W,C], dy[N,OH,OW,O]) -> dw[KH,KW,C/G,O]  (float32)
//
// and the fused layer of the U-Net's blocks and logits, y = relu?(conv(x, w) + b), with the
// bias gradient computed in the same pass over dy as the weight gradient:
//
//   unet_onednn_conv_bias_fwd(x[N,H,W,C], w[KH,KW,C/G,O], b[O]) -> y[N,OH,OW,O] (attr relu: 0/1)
//   unet_onednn_conv_bwd_weights_bias(x[N,H,W,C], dy[N,OH,OW,O]) -> dw[KH,KW,C/G,O], db[O]
//                                                                     (both float32)
//   unet_onednn_conv_bias_sum_fwd(x, w, b, acc[N,OH,OW,O]) -> y = relu?(conv(x, w) + b + acc),
//                                 y aliasing acc: a convolution of two channel-concatenated
//                                 inputs as two calls, without the concatenation
//
// The ReLU is a oneDNN post-op applied to the float32 accumulator before the one rounding to
// the output dtype; its gradient (dy where y > 0) is left to XLA, which fuses it with the ops
// that produce dy.
//
// Primitive descriptors and primitives are cached per shape and dtype. The kernel is given to
// oneDNN in the layout it asks for (format_tag::any), through a reorder when that differs from
// HWIO (grouped: oneDNN's [G, O/G, C/G, KH, KW] dimensions over HWIO's memory, by strides);
// activations stay NHWC.
//
// Threads: XLA calls a handler from any of its threads, while oneDNN's library-managed
// scratchpad (its default) is tied to the thread that created the primitive ("primitives ...
// cannot migrate between threads", dnnl::scratchpad_mode). So every primitive here takes a user
// scratchpad, allocated for each call, and calls are serialised (execute_mutex).

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

enum class Pass { kFwd, kBwdData, kBwdWeights };

// A convolution's shape: input [N,H,W,C], kernel [KH,KW,C/G,O], padding, strides, groups G;
// the output follows.
struct Shape {
  int64_t n, h, w, c, o, kh, kw, pt, pb, pl, pr, sh = 1, sw = 1, g = 1;
  int64_t oh() const { return (h + pt + pb - kh) / sh + 1; }
  int64_t ow() const { return (w + pl + pr - kw) / sw + 1; }
  auto tie() const { return std::make_tuple(n, h, w, c, o, kh, kw, pt, pb, pl, pr, sh, sw, g); }
};

// What a pass computes besides the convolution: a bias (forward: added; backward-weights: its
// gradient), the sum with what the output buffer holds and a ReLU (forward only, post-ops in
// that order).
enum Fusion {
  kNone = 0, kBias = 1, kRelu = 2, kBiasRelu = 3, kSum = 4, kBiasSum = 5, kBiasSumRelu = 7
};

// (pass, dtype, the kernel's dtype as given, fusion, shape)
using Key = std::tuple<int, int, int, int, decltype(std::declval<Shape>().tie())>;

struct Entry {
  dnnl::primitive conv;
  dnnl::memory::desc conv_scratchpad;
  dnnl::memory::desc user_w;  // HWIO, as XLA has it (float32 for the weight gradient).
                              // Its dtype may differ from conv_w's (float32 for bfloat16).
  dnnl::memory::desc conv_w;  // What the primitive wants.
  bool reorder = false;
  dnnl::reorder w_reorder;
  dnnl::memory::desc reorder_scratchpad;
  std::string impl;
};

// Attributes of every primitive here: the caller provides the scratchpad.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

std::mutex cache_mutex;
std::map<Key, std::shared_ptr<Entry>>& Cache() {
  static auto* cache = new std::map<Key, std::shared_ptr<Entry>>();
  return *cache;
}

// The kernel's oneDNN dimensions: (O, C, KH, KW), or (G, O/G, C/G, KH, KW) for groups.
dnnl::memory::dims KernelDims(const Shape& sh) {
  if (sh.g == 1) return {sh.o, sh.c, sh.kh, sh.kw};
  return {sh.g, sh.o / sh.g, sh.c / sh.g, sh.kh, sh.kw};
}

// The kernel as XLA holds it, HWIO [KH, KW, C/G, O] row-major, over KernelDims: output channel
// (g, oc) is column g * O/G + oc.
dnnl::memory::desc HwioKernel(const Shape& sh, dt type) {
  const int64_t i = sh.c / sh.g, o = sh.o;
  if (sh.g == 1) return dnnl::memory::desc(KernelDims(sh), type, tag::hwio);
  return dnnl::memory::desc(KernelDims(sh), type,
                            dnnl::memory::dims{o / sh.g, 1, o, sh.kw * i * o, i * o});
}

std::shared_ptr<Entry> Build(Pass pass, dt type, dt w_type, Fusion fusion, const Shape& sh) {
  auto& eng = Engine();
  const int64_t n = sh.n, h = sh.h, w = sh.w, c = sh.c, o = sh.o;
  const dnnl::memory::dims strides = {sh.sh, sh.sw};
  const dnnl::memory::dims pad_l = {sh.pt, sh.pl};
  const dnnl::memory::dims pad_r = {sh.pb, sh.pr};
  dnnl::memory::desc src({n, c, h, w}, type, tag::nhwc);
  dnnl::memory::desc dst({n, o, sh.oh(), sh.ow()}, type, tag::nhwc);
  dnnl::memory::desc w_any(KernelDims(sh), type, tag::any);
  const bool bias = fusion & kBias;
  dnnl::memory::desc b_md = bias ? dnnl::memory::desc({o}, type, tag::a) : dnnl::memory::desc();
  dnnl::primitive_attr attr = UserScratchpad();
  if (pass == Pass::kFwd && (fusion & (kSum | kRelu))) {
    dnnl::post_ops ops;
    if (fusion & kSum) ops.append_sum(1.f);
    if (fusion & kRelu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    attr.set_post_ops(ops);
  }
  auto algo = dnnl::algorithm::convolution_direct;
  auto e = std::make_shared<Entry>();
  // The forward descriptor is the hint for the backward ones, as oneDNN requires.
  dnnl::convolution_forward::primitive_desc fwd(
      eng, dnnl::prop_kind::forward_training, algo, src, w_any, b_md, dst, strides, pad_l, pad_r,
      attr);
  if (pass == Pass::kFwd) {
    e->conv = dnnl::convolution_forward(fwd);
    e->conv_scratchpad = fwd.scratchpad_desc();
    e->user_w = HwioKernel(sh, w_type);
    e->conv_w = fwd.weights_desc();
    e->impl = fwd.impl_info_str();
  } else if (pass == Pass::kBwdData) {
    dnnl::convolution_backward_data::primitive_desc bwd(eng, algo, src, w_any, dst, strides,
                                                        pad_l, pad_r, fwd, UserScratchpad());
    e->conv = dnnl::convolution_backward_data(bwd);
    e->conv_scratchpad = bwd.scratchpad_desc();
    e->user_w = HwioKernel(sh, w_type);
    e->conv_w = bwd.weights_desc();
    e->impl = bwd.impl_info_str();
  } else {
    dnnl::memory::desc dw_any(KernelDims(sh), dt::f32, tag::any);
    dnnl::memory::desc db_md =
        bias ? dnnl::memory::desc({o}, dt::f32, tag::a) : dnnl::memory::desc();
    dnnl::convolution_backward_weights::primitive_desc bwd(
        eng, algo, src, dw_any, db_md, dst, strides, pad_l, pad_r, fwd, UserScratchpad());
    e->conv = dnnl::convolution_backward_weights(bwd);
    e->conv_scratchpad = bwd.scratchpad_desc();
    e->user_w = HwioKernel(sh, dt::f32);
    e->conv_w = bwd.diff_weights_desc();
    e->impl = bwd.impl_info_str();
  }
  e->reorder = e->conv_w != e->user_w;
  if (e->reorder) {
    auto reorder = pass == Pass::kBwdWeights
        ? dnnl::reorder::primitive_desc(eng, e->conv_w, eng, e->user_w, UserScratchpad())
        : dnnl::reorder::primitive_desc(eng, e->user_w, eng, e->conv_w, UserScratchpad());
    e->w_reorder = dnnl::reorder(reorder);
    e->reorder_scratchpad = reorder.scratchpad_desc();
  }
  return e;
}

std::shared_ptr<Entry> Get(Pass pass, dt type, dt w_type, Fusion fusion, const Shape& sh) {
  Key key{static_cast<int>(pass), static_cast<int>(type), static_cast<int>(w_type),
          static_cast<int>(fusion), sh.tie()};
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto& cache = Cache();
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto e = Build(pass, type, w_type, fusion, sh);
  cache.emplace(key, e);
  return e;
}

bool DnnlType(ffi::DataType type, dt* out) {
  switch (type) {
    case ffi::DataType::F32: *out = dt::f32; return true;
    case ffi::DataType::BF16: *out = dt::bf16; return true;
    default: return false;
  }
}

// One oneDNN call at a time: each runs on all cores (its OpenMP team), and XLA may call several
// handlers at once from its own threads, which would put two teams on the same cores.
std::mutex execute_mutex;

// The operands of one pass. `a` is x (fwd, bwd_weights) or dy (bwd_data); `b` is w (fwd,
// bwd_data) or dy (bwd_weights); `bias` the bias (fused forward), `out` the result and `db` the
// bias gradient (fused backward-weights).
struct Operands {
  ffi::AnyBuffer a, b;
  ffi::AnyBuffer* bias = nullptr;
  ffi::Result<ffi::AnyBuffer>* out;
  ffi::Result<ffi::AnyBuffer>* db = nullptr;
};

// The attributes every handler takes: padding, strides, groups.
struct Geometry {
  int64_t pt, pb, pl, pr, sh, sw, g;
};

ffi::Error Run(Pass pass, Fusion fusion, Operands ops, Geometry geo) {
  try {
    if (geo.pt < 0 || geo.pb < 0 || geo.pl < 0 || geo.pr < 0) {
      return ffi::Error::InvalidArgument("unet_onednn: padding must be >= 0");
    }
    if (geo.sh < 1 || geo.sw < 1 || geo.g < 1) {
      return ffi::Error::InvalidArgument("unet_onednn: strides and groups must be >= 1");
    }
    ffi::AnyBuffer &a = ops.a, &b = ops.b;
    ffi::Result<ffi::AnyBuffer>& out = *ops.out;
    dt type, b_type;
    if (!DnnlType(a.element_type(), &type) || !DnnlType(b.element_type(), &b_type)) {
      return ffi::Error::InvalidArgument("unet_onednn: only float32 and bfloat16");
    }
    // b is the kernel in the forward and backward-data passes: of a's dtype, or float32.
    const bool b_is_kernel = pass != Pass::kBwdWeights;
    if (b_type != type && !(b_is_kernel && b_type == dt::f32)) {
      return ffi::Error::InvalidArgument(
          "unet_onednn: operands of different dtypes (a kernel may be float32)");
    }
    const dt w_type = b_is_kernel ? b_type : type;
    auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
    if (ad.size() != 4 || bd.size() != 4 || od.size() != 4) {
      return ffi::Error::InvalidArgument("unet_onednn: operands must be rank 4");
    }
    Shape sh{0, 0, 0, 0, 0, 0, 0, geo.pt, geo.pb, geo.pl, geo.pr, geo.sh, geo.sw, geo.g};
    // The tensor given as dy (bwd_data, bwd_weights) or returned as y (fwd): [N, OH, OW, O],
    // and the kernel (or its gradient): [KH, KW, C/G, O].
    auto yd = od, kd = bd;
    if (pass == Pass::kFwd) {  // a = x [N,H,W,C], b = w
      sh.n = ad[0]; sh.h = ad[1]; sh.w = ad[2]; sh.c = ad[3];
    } else if (pass == Pass::kBwdData) {  // a = dy, b = w, out = dx [N,H,W,C]
      sh.n = od[0]; sh.h = od[1]; sh.w = od[2]; sh.c = od[3];
      yd = ad;
    } else {  // a = x [N,H,W,C], b = dy, out = dw
      sh.n = ad[0]; sh.h = ad[1]; sh.w = ad[2]; sh.c = ad[3];
      yd = bd;
      kd = od;
    }
    sh.kh = kd[0]; sh.kw = kd[1]; sh.o = kd[3];
    if (sh.c % sh.g || sh.o % sh.g || kd[2] * sh.g != sh.c) {
      return ffi::Error::InvalidArgument("unet_onednn: C mismatch (kernel [KH,KW,C/G,O])");
    }
    if (sh.h + sh.pt + sh.pb < sh.kh || sh.w + sh.pl + sh.pr < sh.kw || yd[0] != sh.n ||
        yd[1] != sh.oh() || yd[2] != sh.ow() || yd[3] != sh.o) {
      return ffi::Error::InvalidArgument("unet_onednn: input/kernel/padding/output shape mismatch");
    }
    if (ops.bias && (ops.bias->element_type() != a.element_type() ||
                     ops.bias->dimensions().size() != 1 || ops.bias->dimensions()[0] != sh.o)) {
      return ffi::Error::InvalidArgument("unet_onednn: the bias must be [O] of x's dtype");
    }
    if (pass == Pass::kBwdWeights &&
        (out->element_type() != ffi::DataType::F32 ||
         (ops.db && (*ops.db)->element_type() != ffi::DataType::F32))) {
      return ffi::Error::InvalidArgument("unet_onednn: the weight and bias gradients are float32");
    }
    auto e = Get(pass, type, w_type, fusion, sh);
    auto& eng = Engine();
    dnnl::memory::desc x_md({sh.n, sh.c, sh.h, sh.w}, type, tag::nhwc);
    dnnl::memory::desc y_md({sh.n, sh.o, sh.oh(), sh.ow()}, type, tag::nhwc);
    // Zero-sized where a primitive needs none.
    dnnl::memory conv_scratchpad(e->conv_scratchpad, eng);
    dnnl::memory reorder_scratchpad(e->reorder_scratchpad, eng);
    std::lock_guard<std::mutex> lock(execute_mutex);
    dnnl::stream s(eng);
    auto reorder = [&](const dnnl::memory& from, const dnnl::memory& to) {
      e->w_reorder.execute(s, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                               {DNNL_ARG_SCRATCHPAD, reorder_scratchpad}});
    };
    if (pass == Pass::kFwd || pass == Pass::kBwdData) {
      dnnl::memory user_w(e->user_w, eng, b.untyped_data());
      dnnl::memory conv_w = user_w;
      if (e->reorder) {
        conv_w = dnnl::memory(e->conv_w, eng);
        reorder(user_w, conv_w);
      }
      if (pass == Pass::kFwd) {
        std::unordered_map<int, dnnl::memory> args = {
            {DNNL_ARG_SRC, dnnl::memory(x_md, eng, a.untyped_data())},
            {DNNL_ARG_WEIGHTS, conv_w},
            {DNNL_ARG_DST, dnnl::memory(y_md, eng, out->untyped_data())},
            {DNNL_ARG_SCRATCHPAD, conv_scratchpad}};
        if (ops.bias) {
          args[DNNL_ARG_BIAS] =
              dnnl::memory({{sh.o}, type, tag::a}, eng, ops.bias->untyped_data());
        }
        e->conv.execute(s, args);
      } else {
        e->conv.execute(s, {{DNNL_ARG_DIFF_DST, dnnl::memory(y_md, eng, a.untyped_data())},
                            {DNNL_ARG_WEIGHTS, conv_w},
                            {DNNL_ARG_DIFF_SRC, dnnl::memory(x_md, eng, out->untyped_data())},
                            {DNNL_ARG_SCRATCHPAD, conv_scratchpad}});
      }
    } else {
      dnnl::memory user_dw(e->user_w, eng, out->untyped_data());
      dnnl::memory conv_dw = e->reorder ? dnnl::memory(e->conv_w, eng) : user_dw;
      std::unordered_map<int, dnnl::memory> args = {
          {DNNL_ARG_SRC, dnnl::memory(x_md, eng, a.untyped_data())},
          {DNNL_ARG_DIFF_DST, dnnl::memory(y_md, eng, b.untyped_data())},
          {DNNL_ARG_DIFF_WEIGHTS, conv_dw},
          {DNNL_ARG_SCRATCHPAD, conv_scratchpad}};
      if (ops.db) {
        args[DNNL_ARG_DIFF_BIAS] =
            dnnl::memory({{sh.o}, dt::f32, tag::a}, eng, (*ops.db)->untyped_data());
      }
      e->conv.execute(s, args);
      if (e->reorder) reorder(conv_dw, user_dw);
    }
    s.wait();
    return ffi::Error::Success();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("unet_onednn: oneDNN error: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("unet_onednn: ") + err.what());
  }
}

// The handlers' geometry attributes (the bindings' UNET_ONEDNN_GEOMETRY), as parameters.
#define UNET_ONEDNN_GEOMETRY_PARAMS \
  int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t sh, int64_t sw, int64_t g
#define UNET_ONEDNN_GEO (Geometry{pt, pb, pl, pr, sh, sw, g})

ffi::Error Fwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
               UNET_ONEDNN_GEOMETRY_PARAMS) {
  return Run(Pass::kFwd, kNone, {x, w, nullptr, &y}, UNET_ONEDNN_GEO);
}
ffi::Error BwdData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                   UNET_ONEDNN_GEOMETRY_PARAMS) {
  return Run(Pass::kBwdData, kNone, {dy, w, nullptr, &dx}, UNET_ONEDNN_GEO);
}
ffi::Error BwdWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                      UNET_ONEDNN_GEOMETRY_PARAMS) {
  return Run(Pass::kBwdWeights, kNone, {x, dy, nullptr, &dw}, UNET_ONEDNN_GEO);
}
ffi::Error BiasFwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer b,
                   ffi::Result<ffi::AnyBuffer> y, UNET_ONEDNN_GEOMETRY_PARAMS, int64_t relu) {
  if (relu != 0 && relu != 1) return ffi::Error::InvalidArgument("unet_onednn: relu is 0 or 1");
  return Run(Pass::kFwd, relu ? kBiasRelu : kBias, {x, w, &b, &y}, UNET_ONEDNN_GEO);
}
// y = relu?(conv(x, w) + b + y): y arrives holding the other half's convolution (the FFI call
// aliases it to the output), for a convolution of two inputs concatenated along channels.
ffi::Error BiasSumFwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer b, ffi::AnyBuffer acc,
                      ffi::Result<ffi::AnyBuffer> y, UNET_ONEDNN_GEOMETRY_PARAMS, int64_t relu) {
  if (relu != 0 && relu != 1) return ffi::Error::InvalidArgument("unet_onednn: relu is 0 or 1");
  if (acc.untyped_data() != y->untyped_data()) {
    return ffi::Error::InvalidArgument("unet_onednn: the sum's operand must alias the output");
  }
  return Run(Pass::kFwd, relu ? kBiasSumRelu : kBiasSum, {x, w, &b, &y}, UNET_ONEDNN_GEO);
}
ffi::Error BwdWeightsBias(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                          ffi::Result<ffi::AnyBuffer> db, UNET_ONEDNN_GEOMETRY_PARAMS) {
  return Run(Pass::kBwdWeights, kBias, {x, dy, nullptr, &dw, &db}, UNET_ONEDNN_GEO);
}

#define UNET_ONEDNN_BUFFER .Arg<ffi::AnyBuffer>()
#define UNET_ONEDNN_GEOMETRY                                                                \
  .Attr<int64_t>("pad_top").Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left")          \
      .Attr<int64_t>("pad_right").Attr<int64_t>("stride_h").Attr<int64_t>("stride_w")      \
      .Attr<int64_t>("groups")
// Two operands, one result, the geometry.
#define UNET_ONEDNN_BINDING \
  ffi::Ffi::Bind() UNET_ONEDNN_BUFFER UNET_ONEDNN_BUFFER.Ret<ffi::AnyBuffer>() UNET_ONEDNN_GEOMETRY

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnConvFwd, Fwd, UNET_ONEDNN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnConvBwdData, BwdData, UNET_ONEDNN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnConvBwdWeights, BwdWeights, UNET_ONEDNN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnConvBiasFwd, BiasFwd,  // x, w, b -> y
                              ffi::Ffi::Bind() UNET_ONEDNN_BUFFER UNET_ONEDNN_BUFFER
                                  UNET_ONEDNN_BUFFER.Ret<ffi::AnyBuffer>() UNET_ONEDNN_GEOMETRY
                                  .Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnConvBiasSumFwd, BiasSumFwd,  // x, w, b, acc -> y
                              ffi::Ffi::Bind() UNET_ONEDNN_BUFFER UNET_ONEDNN_BUFFER
                                  UNET_ONEDNN_BUFFER UNET_ONEDNN_BUFFER.Ret<ffi::AnyBuffer>()
                                  UNET_ONEDNN_GEOMETRY.Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnConvBwdWeightsBias, BwdWeightsBias,  // x, dy -> dw, db
                              ffi::Ffi::Bind() UNET_ONEDNN_BUFFER UNET_ONEDNN_BUFFER
                                  .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
                                  UNET_ONEDNN_GEOMETRY);

// Which oneDNN implementation a pass would use at a shape ("fwd"/"bwd_data"/"bwd_weights"),
// for the benchmark's report. Returns a thread-local string, valid until the next call.
extern "C" const char* unet_onednn_impl(int pass, int bf16, int64_t n, int64_t h, int64_t w,
                                        int64_t c, int64_t o, int64_t kh, int64_t kw, int64_t pt,
                                        int64_t pb, int64_t pl, int64_t pr, int64_t stride_h,
                                        int64_t stride_w, int64_t groups) {
  static thread_local std::string result;
  try {
    Shape sh{n, h, w, c, o, kh, kw, pt, pb, pl, pr, stride_h, stride_w, groups};
    const dt type = bf16 ? dt::bf16 : dt::f32;
    result = Get(static_cast<Pass>(pass), type, type, kNone, sh)->impl;
  } catch (const std::exception& err) {
    result = std::string("error: ") + err.what();
  }
  return result.c_str();
}
