// qedjax's CPU matrix product: an XLA FFI handler that hands a 2-D fp32 product to a BLAS sgemm
// (MKL's cblas_sgemm, located by qedjax/models/cpu_gemm.py and passed in as a function pointer).
// C[m, n] = op(A) op(B), op a transpose where trans_a / trans_b say so; operands row-major, 2-D, or
// 3-D with a leading batch dimension (one product per batch element).
// Built on first use by cpu_gemm.py with the C++ compiler and the FFI headers jaxlib ships.
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// cblas_sgemm(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
typedef void (*Sgemm)(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                      float*, int);
static Sgemm sgemm = nullptr;

extern "C" void qedjax_set_sgemm(void* fn) { sgemm = reinterpret_cast<Sgemm>(fn); }

static ffi::Error Gemm(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> c, bool trans_a,
                       bool trans_b) {
  if (sgemm == nullptr) return ffi::Error::Internal("qedjax_gemm: no sgemm was set");
  if (a.element_type() != ffi::F32 || b.element_type() != ffi::F32 || c->element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("qedjax_gemm: operands must be float32");
  auto da = a.dimensions();
  auto db = b.dimensions();
  auto dc = c->dimensions();
  const size_t rank = da.size();
  if (rank < 2 || rank > 3 || db.size() != rank || dc.size() != rank)
    return ffi::Error::InvalidArgument("qedjax_gemm: operands must be 2-D, or 3-D with a leading batch");
  const int64_t batch = rank == 3 ? da[0] : 1;
  const size_t r = rank - 2;  // the matrix dims of each operand
  const int64_t m = trans_a ? da[r + 1] : da[r], k = trans_a ? da[r] : da[r + 1];
  const int64_t kb = trans_b ? db[r + 1] : db[r], n = trans_b ? db[r] : db[r + 1];
  if (k != kb || dc[r] != m || dc[r + 1] != n || (rank == 3 && (db[0] != batch || dc[0] != batch)))
    return ffi::Error::InvalidArgument("qedjax_gemm: shapes do not multiply");
  const int64_t limit = INT32_MAX;
  if (m > limit || n > limit || k > limit)
    return ffi::Error::InvalidArgument("qedjax_gemm: a dimension exceeds int32");
  if (m == 0 || n == 0 || batch == 0) return ffi::Error::Success();
  const float* pa = static_cast<const float*>(a.untyped_data());
  const float* pb = static_cast<const float*>(b.untyped_data());
  float* pc = static_cast<float*>(c->untyped_data());
  if (k == 0) {  // an empty sum: zeros, as XLA's dot gives (not left to the BLAS's quick return)
    std::memset(pc, 0, sizeof(float) * batch * m * n);
    return ffi::Error::Success();
  }
  const int lda = da[r + 1], ldb = db[r + 1];
  for (int64_t i = 0; i < batch; ++i) {
    // 101: row-major; 111 / 112: no transpose / transpose; beta = 0: c is written, not read.
    sgemm(101, trans_a ? 112 : 111, trans_b ? 112 : 111, m, n, k, 1.0f, pa + i * m * k, lda, pb + i * k * n, ldb,
          0.0f, pc + i * m * n, n);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(QedjaxGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
