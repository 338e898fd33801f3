// edkm_lut: what the kernels' translation unit exports to the others (edkm_step.cpp).
#pragma once

#include <torch/extension.h>

#include <string>

namespace edkm {

// y (T, rows) = x (T, cols) @ W^T for a packed weight (see the layout comment in edkm_lut.cpp).
at::Tensor packed_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& table, int64_t bits,
                       int64_t rows, int64_t cols, int64_t R, int64_t C, const std::string& isa);

// Registers the lean decode step (edkm_step.cpp) on the extension module.
void register_step(pybind11::module& m);

}  // namespace edkm
