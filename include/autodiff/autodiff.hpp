#pragma once
// autodiff: an expression-template autodiff engine specialised for attention.
// One include for everything; see README.md for a tour and docs/GRADIENTS.md for every formula.

#include "autodiff/error.hpp"
#include "autodiff/parallel.hpp"
#include "autodiff/pool.hpp"
#include "autodiff/random.hpp"
#include "autodiff/shape.hpp"
#include "autodiff/tensor.hpp"
#include "autodiff/io/safetensors.hpp"

#include "autodiff/kernels/activation.hpp"
#include "autodiff/kernels/attention.hpp"
#include "autodiff/kernels/dropout.hpp"
#include "autodiff/kernels/elementwise.hpp"
#include "autodiff/kernels/gemm.hpp"
#include "autodiff/kernels/layout.hpp"
#include "autodiff/kernels/linear.hpp"
#include "autodiff/kernels/norm.hpp"
#include "autodiff/kernels/reduce.hpp"
#include "autodiff/kernels/softmax.hpp"

#include "autodiff/tape.hpp"

#include "autodiff/expr/activation.hpp"
#include "autodiff/expr/attention.hpp"
#include "autodiff/expr/elementwise.hpp"
#include "autodiff/expr/layout.hpp"
#include "autodiff/expr/matmul.hpp"
#include "autodiff/expr/node.hpp"
#include "autodiff/expr/norm.hpp"
#include "autodiff/expr/reduce.hpp"
#include "autodiff/expr/softmax.hpp"
#include "autodiff/expr/variable.hpp"

#include "autodiff/check.hpp"
#include "autodiff/graph.hpp"
#include "autodiff/nn/optim.hpp"
#include "autodiff/nn/layer_norm.hpp"
#include "autodiff/nn/linear.hpp"
#include "autodiff/nn/multihead_attention.hpp"
#include "autodiff/nn/transformer.hpp"
#include "autodiff/nn/state.hpp"
