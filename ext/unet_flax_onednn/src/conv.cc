// oneDNN stride-1 convolutions (any KHxKW kernel, explicit zero padding) as XLA FFI handlers.
//
// Layouts as JAX passes them: activations NHWC, kernels HWIO (row-major, so XLA's default
// layouts). float32, or bfloat16 in/out with float32 accumulation; the weight gradient is always
// written as float32 (the Python side casts it to the kernel's dtype). Every handler takes the
// padding as attributes pad_top, pad_bottom, pad_left, pad_right (>= 0), as
// lax.conv_general_dilated's padding ((pad_top, pad_bottom), (pad_left, pad_right)); the output
// is OH = H + pad_top + pad_bottom - KH + 1 rows (and likewise OW).
//
//   unet_onednn_conv_fwd(x[N,H,W,C], w[KH,KW,C,O]) -> y[N,OH,OW,O]            (x's dtype)
//   unet_onednn_conv_bwd_data(dy[N,OH,OW,O], w[KH,KW,C,O]) -> dx[N,H,W,C]     (dy's dtype)
//   unet_onednn_conv_bwd_weights(x[N,H,W,C], dy[N,OH,OW,O]) -> dw[KH,KW,C,O]  (float32)
//
// Primitive descriptors and primitives are cached per shape and dtype. The kernel is given to
// oneDNN in the layout it asks for (format_tag::any), through a reorder when that differs from
// HWIO; activations stay NHWC.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

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

// A convolution's shape: input [N,H,W,C], kernel [KH,KW,C,O], padding; the output follows.
struct Shape {
  int64_t n, h, w, c, o, kh, kw, pt, pb, pl, pr;
  int64_t oh() const { return h + pt + pb - kh + 1; }
  int64_t ow() const { return w + pl + pr - kw + 1; }
  auto tie() const { return std::tie(n, h, w, c, o, kh, kw, pt, pb, pl, pr); }
};

// (pass, dtype, shape)
using Key = std::tuple<int, int, std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                             int64_t, int64_t, int64_t, int64_t, int64_t>>;

struct Entry {
  dnnl::primitive conv;
  dnnl::memory::desc user_w;  // HWIO, as XLA has it (float32 for the weight gradient).
  dnnl::memory::desc conv_w;  // What the primitive wants.
  bool reorder = false;
  dnnl::reorder w_reorder;
  std::string impl;
};

std::mutex cache_mutex;
std::map<Key, std::shared_ptr<Entry>>& Cache() {
  static auto* cache = new std::map<Key, std::shared_ptr<Entry>>();
  return *cache;
}

std::shared_ptr<Entry> Build(Pass pass, dt type, const Shape& sh) {
  auto& eng = Engine();
  const int64_t n = sh.n, h = sh.h, w = sh.w, c = sh.c, o = sh.o, kh = sh.kh, kw = sh.kw;
  const dnnl::memory::dims strides = {1, 1};
  const dnnl::memory::dims pad_l = {sh.pt, sh.pl};
  const dnnl::memory::dims pad_r = {sh.pb, sh.pr};
  dnnl::memory::desc src({n, c, h, w}, type, tag::nhwc);
  dnnl::memory::desc dst({n, o, sh.oh(), sh.ow()}, type, tag::nhwc);
  dnnl::memory::desc w_any({o, c, kh, kw}, type, tag::any);
  auto algo = dnnl::algorithm::convolution_direct;
  auto e = std::make_shared<Entry>();
  // The forward descriptor is the hint for the backward ones, as oneDNN requires.
  dnnl::convolution_forward::primitive_desc fwd(
      eng, dnnl::prop_kind::forward_training, algo, src, w_any, dst, strides, pad_l, pad_r);
  if (pass == Pass::kFwd) {
    e->conv = dnnl::convolution_forward(fwd);
    e->user_w = dnnl::memory::desc({o, c, kh, kw}, type, tag::hwio);
    e->conv_w = fwd.weights_desc();
    e->impl = fwd.impl_info_str();
  } else if (pass == Pass::kBwdData) {
    dnnl::convolution_backward_data::primitive_desc bwd(eng, algo, src, w_any, dst, strides,
                                                        pad_l, pad_r, fwd);
    e->conv = dnnl::convolution_backward_data(bwd);
    e->user_w = dnnl::memory::desc({o, c, kh, kw}, type, tag::hwio);
    e->conv_w = bwd.weights_desc();
    e->impl = bwd.impl_info_str();
  } else {
    dnnl::memory::desc dw_any({o, c, kh, kw}, dt::f32, tag::any);
    dnnl::convolution_backward_weights::primitive_desc bwd(eng, algo, src, dw_any, dst, strides,
                                                           pad_l, pad_r, fwd);
    e->conv = dnnl::convolution_backward_weights(bwd);
    e->user_w = dnnl::memory::desc({o, c, kh, kw}, dt::f32, tag::hwio);
    e->conv_w = bwd.diff_weights_desc();
    e->impl = bwd.impl_info_str();
  }
  e->reorder = e->conv_w != e->user_w;
  if (e->reorder) {
    if (pass == Pass::kBwdWeights) {
      e->w_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(eng, e->conv_w, eng, e->user_w));
    } else {
      e->w_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(eng, e->user_w, eng, e->conv_w));
    }
  }
  return e;
}

std::shared_ptr<Entry> Get(Pass pass, dt type, const Shape& sh) {
  Key key{static_cast<int>(pass), static_cast<int>(type), sh.tie()};
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto& cache = Cache();
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto e = Build(pass, type, sh);
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

// Runs one pass. `act` is x (fwd, bwd_weights) or dy (bwd_data); `other` is w (fwd, bwd_data) or
// dy (bwd_weights); `out` the result.
ffi::Error Run(Pass pass, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
               int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  try {
    if (pt < 0 || pb < 0 || pl < 0 || pr < 0) {
      return ffi::Error::InvalidArgument("unet_onednn: padding must be >= 0");
    }
    if (a.element_type() != b.element_type()) {
      return ffi::Error::InvalidArgument("unet_onednn: operands of different dtypes");
    }
    dt type;
    if (!DnnlType(a.element_type(), &type)) {
      return ffi::Error::InvalidArgument("unet_onednn: only float32 and bfloat16");
    }
    auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
    if (ad.size() != 4 || bd.size() != 4 || od.size() != 4) {
      return ffi::Error::InvalidArgument("unet_onednn: operands must be rank 4");
    }
    Shape sh{0, 0, 0, 0, 0, 0, 0, pt, pb, pl, pr};
    // The tensor given as dy (bwd_data, bwd_weights) or returned as y (fwd): [N, OH, OW, O].
    auto yd = od;
    if (pass == Pass::kFwd) {  // a = x [N,H,W,C], b = w [KH,KW,C,O]
      sh.n = ad[0]; sh.h = ad[1]; sh.w = ad[2]; sh.c = ad[3];
      sh.kh = bd[0]; sh.kw = bd[1]; sh.o = bd[3];
      if (bd[2] != sh.c) return ffi::Error::InvalidArgument("unet_onednn: C mismatch");
    } else if (pass == Pass::kBwdData) {  // a = dy [N,OH,OW,O], b = w [KH,KW,C,O], out = dx
      sh.n = od[0]; sh.h = od[1]; sh.w = od[2]; sh.c = od[3];
      sh.kh = bd[0]; sh.kw = bd[1]; sh.o = bd[3];
      yd = ad;
      if (bd[2] != sh.c) return ffi::Error::InvalidArgument("unet_onednn: C mismatch");
    } else {  // a = x [N,H,W,C], b = dy [N,OH,OW,O], out = dw [KH,KW,C,O]
      sh.n = ad[0]; sh.h = ad[1]; sh.w = ad[2]; sh.c = ad[3];
      sh.kh = od[0]; sh.kw = od[1]; sh.o = od[3];
      yd = bd;
      if (od[2] != sh.c) return ffi::Error::InvalidArgument("unet_onednn: C mismatch");
    }
    if (yd[0] != sh.n || yd[1] != sh.oh() || yd[2] != sh.ow() || yd[3] != sh.o || sh.oh() < 1 ||
        sh.ow() < 1) {
      return ffi::Error::InvalidArgument("unet_onednn: input/kernel/padding/output shape mismatch");
    }
    auto e = Get(pass, type, sh);
    auto& eng = Engine();
    dnnl::stream s(eng);
    dnnl::memory::desc x_md({sh.n, sh.c, sh.h, sh.w}, type, tag::nhwc);
    dnnl::memory::desc y_md({sh.n, sh.o, sh.oh(), sh.ow()}, type, tag::nhwc);
    if (pass == Pass::kFwd) {
      dnnl::memory x(x_md, eng, a.untyped_data());
      dnnl::memory user_w(e->user_w, eng, b.untyped_data());
      dnnl::memory y(y_md, eng, out->untyped_data());
      dnnl::memory conv_w = user_w;
      if (e->reorder) {
        conv_w = dnnl::memory(e->conv_w, eng);
        e->w_reorder.execute(s, user_w, conv_w);
      }
      e->conv.execute(s, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, conv_w}, {DNNL_ARG_DST, y}});
    } else if (pass == Pass::kBwdData) {
      dnnl::memory dy(y_md, eng, a.untyped_data());
      dnnl::memory user_w(e->user_w, eng, b.untyped_data());
      dnnl::memory dx(x_md, eng, out->untyped_data());
      dnnl::memory conv_w = user_w;
      if (e->reorder) {
        conv_w = dnnl::memory(e->conv_w, eng);
        e->w_reorder.execute(s, user_w, conv_w);
      }
      e->conv.execute(s, {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, conv_w},
                          {DNNL_ARG_DIFF_SRC, dx}});
    } else {
      if (out->element_type() != ffi::DataType::F32) {
        return ffi::Error::InvalidArgument("unet_onednn: the weight gradient is float32");
      }
      dnnl::memory x(x_md, eng, a.untyped_data());
      dnnl::memory dy(y_md, eng, b.untyped_data());
      dnnl::memory user_dw(e->user_w, eng, out->untyped_data());
      dnnl::memory conv_dw = e->reorder ? dnnl::memory(e->conv_w, eng) : user_dw;
      e->conv.execute(s, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, dy},
                          {DNNL_ARG_DIFF_WEIGHTS, conv_dw}});
      if (e->reorder) e->w_reorder.execute(s, conv_dw, user_dw);
    }
    s.wait();
    return ffi::Error::Success();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("unet_onednn: oneDNN error: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("unet_onednn: ") + err.what());
  }
}

ffi::Error Fwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, int64_t pt,
               int64_t pb, int64_t pl, int64_t pr) {
  return Run(Pass::kFwd, x, w, y, pt, pb, pl, pr);
}
ffi::Error BwdData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run(Pass::kBwdData, dy, w, dx, pt, pb, pl, pr);
}
ffi::Error BwdWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                      int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run(Pass::kBwdWeights, x, dy, dw, pt, pb, pl, pr);
}

#define UNET_ONEDNN_BINDING                  \
  ffi::Ffi::Bind()                           \
      .Arg<ffi::AnyBuffer>()                 \
      .Arg<ffi::AnyBuffer>()                 \
      .Ret<ffi::AnyBuffer>()                 \
      .Attr<int64_t>("pad_top")              \
      .Attr<int64_t>("pad_bottom")           \
      .Attr<int64_t>("pad_left")             \
      .Attr<int64_t>("pad_right")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnConvFwd, Fwd, UNET_ONEDNN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnConvBwdData, BwdData, UNET_ONEDNN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnConvBwdWeights, BwdWeights, UNET_ONEDNN_BINDING);

// Which oneDNN implementation a pass would use at a shape ("fwd"/"bwd_data"/"bwd_weights"),
// for the benchmark's report. Returns a thread-local string, valid until the next call.
extern "C" const char* unet_onednn_impl(int pass, int bf16, int64_t n, int64_t h, int64_t w,
                                        int64_t c, int64_t o, int64_t kh, int64_t kw, int64_t pt,
                                        int64_t pb, int64_t pl, int64_t pr) {
  static thread_local std::string result;
  try {
    Shape sh{n, h, w, c, o, kh, kw, pt, pb, pl, pr};
    result = Get(static_cast<Pass>(pass), bf16 ? dt::bf16 : dt::f32, sh)->impl;
  } catch (const std::exception& err) {
    result = std::string("error: ") + err.what();
  }
  return result.c_str();
}
