// Bindings of sgd_step (sgd_step/sgd_step.h). Lists hold one entry per tensor; theta
// entries of a shared θ point at [N] data, all others at [T, N]; a 0 output pointer =
// not requested. One exception to "pointers only", for speed: sgd_step_fwd_cpu_lean takes
// the tensors and checks them here (it only accepts or declines; the Python general path
// reports what is wrong).
#include <string>

#include "common/bindings.h"
#include "sgd_step/sgd_step.h"
#include "sgd_step/sgd_step_api.h"

namespace fastmaml {
namespace bind {

namespace {

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

void register_sgd_step(py::module_& m) {
  // the CUDA launch geometry (sgd_step/sgd_step.h), for tests and docs
  m.attr("SGD_STEP_CUDA_TABLE") = py::make_tuple(kSgdStepMaxTensors, kSgdStepMaxBlocks, kSgdStepBlockThreads,
                                                 kSgdStepFwdRows);
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
  // (fastmaml/ops/_sgd_step/launch.py, lean_cpu_forward): checks, allocation (by the given
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

}

}  // namespace bind
}  // namespace fastmaml
