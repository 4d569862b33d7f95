// pybind11 bindings of fastmaml._C: one registration per op. The module does not link
// against PyTorch: tensors cross as data pointers (ints), sizes and strides, and CUDA
// streams as integer handles. All checking happens in Python first
// (fastmaml/_checks.py); the launchers re-check what they rely on. One exception, for
// speed: sgd_step_fwd_cpu_lean takes the tensors and checks them here (it only accepts
// or declines; the Python general path reports what is wrong).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <string>
#include <type_traits>

#include "multi_tensor.h"
#include "ops.h"
#include "sgd_step.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef FASTMAML_CUDA_REASON
#define FASTMAML_CUDA_REASON ""
#endif

namespace py = pybind11;
using namespace fastmaml;

#ifdef FASTMAML_CUDA_EMULATE
namespace fastmaml {
void register_cuda_emulation(py::module_& m);  // common/cuda_emulation_module.cpp
}
#endif

namespace {

#ifdef FASTMAML_WITH_CUDA
constexpr bool kCudaCompiled = true;
#else
constexpr bool kCudaCompiled = false;
// Without nvcc the CUDA entry points still exist and raise a clear error.
[[noreturn]] void no_cuda() {
  throw std::runtime_error(std::string("fastmaml._C was built without CUDA: ") + FASTMAML_CUDA_REASON);
}
#endif

using PtrList = std::vector<std::uintptr_t>;

// A list (or tuple) of Python ints as a vector. pybind11's generic list caster costs
// about 0.1 µs per element; a sinusoid-sized sgd_step call passes ~40 of them, so these
// read the items directly. Non-ints raise TypeError; values that do not fit the element
// type raise OverflowError (pointers, 64-bit sizes) or ValueError (int flags).
template <class T>
std::vector<T> int_list(py::handle obj, const char* name) {
  PyObject* seq = obj.ptr();
  if (!PyList_Check(seq) && !PyTuple_Check(seq))
    throw py::type_error(std::string(name) + " must be a list of ints, got " + Py_TYPE(seq)->tp_name);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  std::vector<T> out(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    if (!PyLong_Check(item) || PyBool_Check(item))
      throw py::type_error(std::string(name) + "[" + std::to_string(i) + "] must be an int, got " +
                           Py_TYPE(item)->tp_name);
    if constexpr (std::is_unsigned_v<T>) {
      const unsigned long long v = PyLong_AsUnsignedLongLong(item);
      if (PyErr_Occurred()) throw py::error_already_set();
      out[i] = static_cast<T>(v);
    } else {
      const long long v = PyLong_AsLongLong(item);
      if (PyErr_Occurred()) throw py::error_already_set();
      if (v < static_cast<long long>(std::numeric_limits<T>::min()) ||
          v > static_cast<long long>(std::numeric_limits<T>::max()))
        throw py::value_error(std::string(name) + "[" + std::to_string(i) + "] is out of range: " + std::to_string(v));
      out[i] = static_cast<T>(v);
    }
  }
  return out;
}

PtrList ptr_list(py::handle obj, const char* name) { return int_list<std::uintptr_t>(obj, name); }

SgdStepArgs sgd_step_args(py::handle theta, py::handle grad, py::handle numel, py::handle shared,
                          std::int64_t tasks, int dtype, int lr_mode, double lr_value, py::handle lr) {
  SgdStepArgs a;
  a.theta = ptr_list(theta, "theta");
  a.grad = ptr_list(grad, "grad");
  a.numel = int_list<std::int64_t>(numel, "numel");
  a.shared = int_list<int>(shared, "shared");
  a.tasks = tasks;
  a.dtype = dtype;
  a.lr_mode = lr_mode;
  a.lr_value = lr_value;
  a.lr = ptr_list(lr, "lr");
  return a;
}

// The (numel, shared) pair of tensor i from the shapes of params[i] (ps) and grads[i]
// (gs), tuples of ints: shared when ps == gs[1:], per task when ps == gs; gs[0] must be
// T. False when neither holds or a shape is malformed (the caller reports it).
bool sgd_step_pair_layout(PyObject* ps, PyObject* gs, std::int64_t tasks, std::int64_t* numel, int* shared) {
  if (!PyTuple_Check(ps) || !PyTuple_Check(gs)) return false;
  const Py_ssize_t np = PyTuple_GET_SIZE(ps), ng = PyTuple_GET_SIZE(gs);
  if (ng < 1 || (np != ng && np + 1 != ng)) return false;
  auto dim = [](PyObject* t, Py_ssize_t k, long long* v) {
    PyObject* o = PyTuple_GET_ITEM(t, k);
    if (!PyLong_Check(o)) return false;
    *v = PyLong_AsLongLong(o);
    if (PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return *v >= 0;
  };
  long long t0 = 0;
  if (!dim(gs, 0, &t0) || t0 != tasks) return false;
  const Py_ssize_t skip = ng - np;  // 1: ps lines up with gs[1:]; 0: with all of gs
  long long n = 1;
  for (Py_ssize_t k = 1; k < ng; ++k) {
    long long a = 0, b = 0;
    if (!dim(gs, k, &a) || !dim(ps, k - skip, &b) || a != b) return false;
    n *= a;
  }
  if (skip == 0) {
    long long p0 = 0;
    if (!dim(ps, 0, &p0) || p0 != t0) return false;
  }
  *numel = n;
  *shared = static_cast<int>(skip);
  return true;
}

// ---- the lean sgd_step forward -------------------------------------------------------
// ops.sgd_step's commonest call (CPU tensors, a Python-float lr, nothing to
// differentiate) is dominated by per-tensor Python work for small networks (the
// sinusoid MLP: 6 tensors, a 5 µs kernel). This does that work here, reading each
// tensor's attributes through the C API: the same facts ops.sgd_step checks (dtype,
// device, contiguity, requires_grad when asked, shapes), then one empty_like per output
// and the kernel. Any failed check returns None having computed nothing; the caller
// then takes its general path, whose named checks raise. So do outputs of max_out_bytes
// or more, which the caller allocates as one buffer.

struct LeanNames {
  PyObject *dtype, *is_cpu, *is_contiguous, *requires_grad, *shape, *data_ptr;
};

const LeanNames& lean_names() {
  static const LeanNames names = {
      PyUnicode_InternFromString("dtype"),         PyUnicode_InternFromString("is_cpu"),
      PyUnicode_InternFromString("is_contiguous"), PyUnicode_InternFromString("requires_grad"),
      PyUnicode_InternFromString("shape"),         PyUnicode_InternFromString("data_ptr")};
  return names;
}

// v (a new reference, or null after a Python error) is exactly `want`; releases v.
bool release_is(PyObject* v, PyObject* want) {
  if (v == nullptr) {
    PyErr_Clear();
    return false;
  }
  const bool ok = v == want;
  Py_DECREF(v);
  return ok;
}

// attr is exactly `want` (identity: dtype objects, True/False)
bool attr_is(PyObject* t, PyObject* name, PyObject* want) { return release_is(PyObject_GetAttr(t, name), want); }

bool call_is_true(PyObject* t, PyObject* method) { return release_is(PyObject_CallMethodNoArgs(t, method), Py_True); }

bool data_ptr_of(PyObject* t, std::uintptr_t* out) {
  PyObject* v = PyObject_CallMethodNoArgs(t, lean_names().data_ptr);
  if (v == nullptr) {
    PyErr_Clear();
    return false;
  }
  *out = static_cast<std::uintptr_t>(PyLong_AsUnsignedLongLong(v));
  Py_DECREF(v);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// One tensor: dtype, CPU, contiguous, requires_grad false (when asked); its shape (a new
// reference) or null when any check fails.
PyObject* lean_checked_shape(PyObject* t, PyObject* dtype, bool check_rg) {
  const LeanNames& k = lean_names();
  if (!attr_is(t, k.dtype, dtype) || !attr_is(t, k.is_cpu, Py_True) || !call_is_true(t, k.is_contiguous)) return nullptr;
  if (check_rg && !attr_is(t, k.requires_grad, Py_False)) return nullptr;
  PyObject* s = PyObject_GetAttr(t, k.shape);
  if (s == nullptr) PyErr_Clear();
  return s;
}

// One input tensor: the checks above; its shape and data pointer.
bool lean_input(PyObject* t, PyObject* dtype, bool check_rg, py::object* shape, std::uintptr_t* ptr) {
  PyObject* s = lean_checked_shape(t, dtype, check_rg);
  if (s == nullptr) return false;
  *shape = py::reinterpret_steal<py::object>(s);
  return data_ptr_of(t, ptr);
}

// One caller-provided output: the checks above and shaped exactly like grads[i]
// (g_shape); its data pointer.
bool lean_output(PyObject* t, PyObject* dtype, bool check_rg, PyObject* g_shape, std::uintptr_t* ptr) {
  PyObject* s = lean_checked_shape(t, dtype, check_rg);
  if (s == nullptr) return false;
  const int same = PyObject_RichCompareBool(s, g_shape, Py_EQ);
  Py_DECREF(s);
  if (same != 1) {
    if (same < 0) PyErr_Clear();
    return false;
  }
  return data_ptr_of(t, ptr);
}

py::object sgd_step_fwd_cpu_lean(PyObject* params, PyObject* grads, PyObject* dtype, int dtype_code, bool check_rg,
                                 double lr_value, PyObject* empty_like, std::int64_t max_out_bytes, PyObject* out_arg) {
  if (!(PyList_Check(params) || PyTuple_Check(params)) || !(PyList_Check(grads) || PyTuple_Check(grads)))
    return py::none();
  const bool given = out_arg != Py_None;  // out= : write into these tensors instead of new ones
  if (given && !(PyList_Check(out_arg) || PyTuple_Check(out_arg))) return py::none();
  // Tuples hold the tensors for the whole call: a list could be changed by Python code
  // that an attribute read runs (a tensor subclass), which would move its item array.
  const py::tuple p_items = py::reinterpret_steal<py::tuple>(PySequence_Tuple(params));
  const py::tuple g_items = py::reinterpret_steal<py::tuple>(PySequence_Tuple(grads));
  if (!p_items || !g_items) throw py::error_already_set();
  py::tuple o_items;
  if (given) {
    o_items = py::reinterpret_steal<py::tuple>(PySequence_Tuple(out_arg));
    if (!o_items) throw py::error_already_set();
  }
  const Py_ssize_t n = PyTuple_GET_SIZE(p_items.ptr());
  if (n == 0 || PyTuple_GET_SIZE(g_items.ptr()) != n) return py::none();
  if (given && PyTuple_GET_SIZE(o_items.ptr()) != n) return py::none();
  PyObject** ps = &PyTuple_GET_ITEM(p_items.ptr(), 0);
  PyObject** gs = &PyTuple_GET_ITEM(g_items.ptr(), 0);
  SgdStepArgs a;
  a.theta.resize(n);
  a.grad.resize(n);
  a.numel.resize(n);
  a.shared.resize(n);
  a.dtype = dtype_code;
  a.lr_mode = 0;
  a.lr_value = lr_value;
  PtrList out(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    py::object p_shape, g_shape;
    if (!lean_input(ps[i], dtype, check_rg, &p_shape, &a.theta[i]) ||
        !lean_input(gs[i], dtype, check_rg, &g_shape, &a.grad[i]))
      return py::none();
    if (i == 0) {  // T = grads[0].shape[0]
      PyObject* g0 = g_shape.ptr();
      if (!PyTuple_Check(g0) || PyTuple_GET_SIZE(g0) < 1) return py::none();
      const long long t = PyLong_AsLongLong(PyTuple_GET_ITEM(g0, 0));
      if (PyErr_Occurred()) {
        PyErr_Clear();
        return py::none();
      }
      if (t < 1) return py::none();
      a.tasks = t;
    }
    if (!sgd_step_pair_layout(p_shape.ptr(), g_shape.ptr(), a.tasks, &a.numel[i], &a.shared[i])) return py::none();
    if (given && !lean_output(PyTuple_GET_ITEM(o_items.ptr(), i), dtype, check_rg, g_shape.ptr(), &out[i]))
      return py::none();
  }
  py::list outs(n);
  if (given) {  // the caller's tensors, returned as given
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* o = PyTuple_GET_ITEM(o_items.ptr(), i);
      Py_INCREF(o);
      PyList_SET_ITEM(outs.ptr(), i, o);  // steals the new reference
    }
  } else {
    std::int64_t total = 0;
    for (Py_ssize_t i = 0; i < n; ++i) total += a.numel[i] * a.tasks;
    if (total * (dtype_code == 1 ? 8 : 4) >= max_out_bytes) return py::none();  // the caller allocates large outputs
    // Outputs: one empty_like(grads[i]) each; contiguous because grads[i] is.
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* o = PyObject_CallOneArg(empty_like, gs[i]);
      if (o == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(outs.ptr(), i, o);  // steals o
      if (!data_ptr_of(o, &out[i])) throw std::runtime_error("sgd_step: the new output has no data pointer");
    }
  }
  {
    py::gil_scoped_release nogil;
    sgd_step_fwd_cpu(a, out);  // also rejects overlapping inputs and outputs (ValueError)
  }
  return std::move(outs);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmaml compiled kernels (C++/OpenMP and CUDA); takes raw pointers, see fastmaml.ops";
  m.attr("cuda_compiled") = kCudaCompiled;
  m.attr("cuda_reason") = std::string(kCudaCompiled ? "" : FASTMAML_CUDA_REASON);
#ifdef FASTMAML_CUDA_EMULATE
  register_cuda_emulation(m);  // the CUDA kernels run on the CPU (FASTMAML_CUDA=emulate)
#else
  m.attr("cuda_emulated") = false;
#endif
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.attr("compiler") = std::string(__VERSION__);

  m.def("openmp_max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1, got " + std::to_string(n));
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
  });
  m.def("cuda_device_count", []() {
#ifdef FASTMAML_WITH_CUDA
    std::string err;
    int n = cuda_device_count(&err);
    return py::make_tuple(n, err);
#else
    return py::make_tuple(0, std::string("built without CUDA: ") + FASTMAML_CUDA_REASON);
#endif
  }, "(number of CUDA devices, error message or '')");
  m.def("cuda_probe", []() {
#ifdef FASTMAML_WITH_CUDA
    return cuda_probe();
#else
    return std::string("built without CUDA: ") + FASTMAML_CUDA_REASON;
#endif
  }, "'' when a kernel of this build runs on the current CUDA device, else the reason");
  m.def("cuda_runtime_version", []() {
#ifdef FASTMAML_WITH_CUDA
    return cuda_runtime_version();
#else
    return 0;
#endif
  });

  // ---- ops (one block per op) ----------------------------------------------------

  // sgd_step (csrc/sgd_step.h). Lists hold one entry per tensor; theta entries of a
  // shared θ point at [N] data, all others at [T, N]; a 0 output pointer = not requested.
  m.def("sgd_step_fwd_cpu",
        [](py::handle theta, py::handle grad, py::handle out_list, py::handle numel, py::handle shared,
           std::int64_t tasks, int dtype, int lr_mode, double lr_value, py::handle lr) {
          SgdStepArgs a = sgd_step_args(theta, grad, numel, shared, tasks, dtype, lr_mode, lr_value, lr);
          const PtrList out = ptr_list(out_list, "out");
          py::gil_scoped_release nogil;
          sgd_step_fwd_cpu(a, out);
        },
        py::arg("theta"), py::arg("grad"), py::arg("out"), py::arg("numel"), py::arg("shared"), py::arg("tasks"),
        py::arg("dtype"), py::arg("lr_mode"), py::arg("lr_value"), py::arg("lr"));
  // The whole no-autograd forward of ops.sgd_step for CPU tensors and a Python-float lr
  // (fastmaml/ops/sgd_step.py, _lean_cpu_forward): checks, allocation (by the given
  // empty_like) and kernel in one call; None when any check fails or when the outputs
  // would take max_out_bytes or more (the caller allocates those itself). With `out` (a
  // list of n tensors shaped like grads) the update is written there instead, whatever
  // its size, and the list of those tensors is returned.
  m.def("sgd_step_fwd_cpu_lean",
        [](py::handle params, py::handle grads, py::handle dtype, int dtype_code, bool check_requires_grad,
           double lr_value, py::handle empty_like, std::int64_t max_out_bytes, py::handle out) -> py::object {
          return sgd_step_fwd_cpu_lean(params.ptr(), grads.ptr(), dtype.ptr(), dtype_code, check_requires_grad,
                                       lr_value, empty_like.ptr(), max_out_bytes, out.ptr());
        },
        py::arg("params"), py::arg("grads"), py::arg("dtype"), py::arg("dtype_code"),
        py::arg("check_requires_grad"), py::arg("lr_value"), py::arg("empty_like"), py::arg("max_out_bytes"),
        py::arg("out") = py::none());
  m.def("sgd_step_bwd_cpu",
        [](py::handle v_list, py::handle grad, py::handle numel, py::handle shared, std::int64_t tasks, int dtype,
           int lr_mode, double lr_value, py::handle lr, py::handle dtheta_list, py::handle dgrad_list,
           py::handle dlr_list) {
          // θ is not read by the backward; v stands in for it in the shared argument checks.
          SgdStepArgs a = sgd_step_args(v_list, grad, numel, shared, tasks, dtype, lr_mode, lr_value, lr);
          const PtrList& v = a.theta;
          const PtrList dtheta = ptr_list(dtheta_list, "dtheta");
          const PtrList dgrad = ptr_list(dgrad_list, "dgrad"), dlr = ptr_list(dlr_list, "dlr");
          py::gil_scoped_release nogil;
          sgd_step_bwd_cpu(a, v, dtheta, dgrad, dlr);
        },
        py::arg("v"), py::arg("grad"), py::arg("numel"), py::arg("shared"), py::arg("tasks"), py::arg("dtype"),
        py::arg("lr_mode"), py::arg("lr_value"), py::arg("lr"), py::arg("dtheta"), py::arg("dgrad"),
        py::arg("dlr"));
  m.def("sgd_step_fwd_cuda",
        [](py::handle theta, py::handle grad, py::handle out_list, py::handle numel, py::handle shared,
           std::int64_t tasks, int dtype, int lr_mode, double lr_value, py::handle lr, int device,
           std::uintptr_t stream, bool force_index64) {
#ifdef FASTMAML_WITH_CUDA
          SgdStepArgs a = sgd_step_args(theta, grad, numel, shared, tasks, dtype, lr_mode, lr_value, lr);
          const PtrList out = ptr_list(out_list, "out");
          py::gil_scoped_release nogil;
          sgd_step_check_args(a, &out);
          sgd_step_check_overlap_outputs(a, &out);  // outputs may be caller-provided (out=)
          sgd_step_fwd_cuda(a, out, device, stream, force_index64);
#else
          no_cuda();
#endif
        },
        py::arg("theta"), py::arg("grad"), py::arg("out"), py::arg("numel"), py::arg("shared"), py::arg("tasks"),
        py::arg("dtype"), py::arg("lr_mode"), py::arg("lr_value"), py::arg("lr"), py::arg("device"),
        py::arg("stream"), py::arg("force_index64") = false);
  m.def("sgd_step_bwd_cuda",
        [](py::handle v_list, py::handle grad, py::handle numel, py::handle shared, std::int64_t tasks, int dtype,
           int lr_mode, double lr_value, py::handle lr, py::handle dtheta_list, py::handle dgrad_list,
           py::handle dlr_list, int device, std::uintptr_t stream, bool force_index64) {
#ifdef FASTMAML_WITH_CUDA
          // θ is not read by the backward; v stands in for it in the shared argument checks.
          SgdStepArgs a = sgd_step_args(v_list, grad, numel, shared, tasks, dtype, lr_mode, lr_value, lr);
          const PtrList& v = a.theta;
          const PtrList dtheta = ptr_list(dtheta_list, "dtheta");
          const PtrList dgrad = ptr_list(dgrad_list, "dgrad"), dlr = ptr_list(dlr_list, "dlr");
          py::gil_scoped_release nogil;
          sgd_step_bwd_cuda(a, v, dtheta, dgrad, dlr, device, stream, force_index64);
#else
          no_cuda();
#endif
        },
        py::arg("v"), py::arg("grad"), py::arg("numel"), py::arg("shared"), py::arg("tasks"), py::arg("dtype"),
        py::arg("lr_mode"), py::arg("lr_value"), py::arg("lr"), py::arg("dtheta"), py::arg("dgrad"),
        py::arg("dlr"), py::arg("device"), py::arg("stream"), py::arg("force_index64") = false);
  // The chunk tables of an apex-style multi-tensor launch (csrc/multi_tensor.h), exposed
  // so their logic (including > 2^31-element tensors) is tested without a GPU.
  m.def("multi_tensor_plan",
        [](const std::vector<std::int64_t>& cols, std::int64_t rows, std::int64_t col_chunk, std::int64_t row_chunk,
           int max_tensors, int max_blocks) {
          MultiTensorPlan p = plan_multi_tensor(cols, rows, col_chunk, row_chunk, max_tensors, max_blocks);
          py::list launches;
          for (const LaunchPlan& l : p.launches) {
            py::dict d;
            d["tensors"] = l.tensors;
            d["block_slot"] = l.block_slot;
            d["block_col"] = l.block_col;
            d["block_row"] = l.block_row;
            d["first_block"] = l.first_block;
            launches.append(d);
          }
          py::dict out;
          out["launches"] = launches;
          out["tensor_first_block"] = p.tensor_first_block;
          out["tensor_blocks"] = p.tensor_blocks;
          out["total_blocks"] = p.total_blocks;
          out["needs_index64"] = p.needs_index64;
          return out;
        },
        py::arg("cols"), py::arg("rows"), py::arg("col_chunk"), py::arg("row_chunk"), py::arg("max_tensors"),
        py::arg("max_blocks"));
  m.attr("SGD_STEP_CUDA_TABLE") = py::make_tuple(kSgdStepMaxTensors, kSgdStepMaxBlocks, kSgdStepBlockThreads,
                                                 kSgdStepFwdRows);

  // batch_norm in batch-statistics mode (csrc/batch_norm_cpu.cpp; fastmaml/batch_norm.py).
  // Raw pointers, no checks here: the Python caller allocates and validates every tensor.
  m.def("batch_norm_fwd_cpu", &batch_norm_fwd_cpu, py::call_guard<py::gil_scoped_release>(),
        "(dtype, N, C, L, x, w, b, y, mean, rstd, eps, threads): y, mean, rstd of batch-statistics BN (CPU)");
  m.def("batch_norm_bwd_cpu", &batch_norm_bwd_cpu, py::call_guard<py::gil_scoped_release>(),
        "(dtype, N, C, L, x, w, mean, rstd, gy, dx, dw, db, threads): its backward (CPU; dx may be 0)");
  m.def("batch_norm_bwd_bwd_cpu", &batch_norm_bwd_bwd_cpu, py::call_guard<py::gil_scoped_release>(),
        "(dtype, N, C, L, x, w, mean, rstd, gy, a, bw, bb, g_gy, g_x, g_w, threads): its double backward (CPU)");

  // mlp_loss_and_grad / mlp_hvp / maml_mlp (csrc/mlp.h)
  m.def("mlp_loss_and_grad_cpu", &mlp_loss_and_grad_cpu, "per-task MLP loss [T] and gradient (CPU)");
  m.def("mlp_hvp_cpu", &mlp_hvp_cpu, "per-task MLP Hessian-vector product (CPU)");
  m.def("maml_mlp_workspace_elems", &maml_mlp_workspace_elems, "per-task workspace of maml_mlp (elements)");
  m.def("maml_mlp_cpu", &maml_mlp_cpu, "fused MAML meta-step of an MLP: forward (+ adjoint) (CPU)");
  m.def("first_nonfinite_cpu", &first_nonfinite_cpu,
        "index of the first contiguous float tensor (pointers, element counts) holding NaN/Inf, or -1 (CPU)");
#ifdef FASTMAML_WITH_CUDA
  m.def("mlp_loss_and_grad_cuda", &mlp_loss_and_grad_cuda);
  m.def("mlp_hvp_cuda", &mlp_hvp_cuda);
  m.def("maml_mlp_cuda", &maml_mlp_cuda);
  m.def("maml_mlp_cuda_smem_limit", &maml_mlp_cuda_smem_limit);
#else
  m.def("mlp_loss_and_grad_cuda", [](py::args, py::kwargs) { no_cuda(); });
  m.def("mlp_hvp_cuda", [](py::args, py::kwargs) { no_cuda(); });
  m.def("maml_mlp_cuda", [](py::args, py::kwargs) { no_cuda(); });
  m.def("maml_mlp_cuda_smem_limit", [](int) -> int64_t { no_cuda(); });
#endif
}
