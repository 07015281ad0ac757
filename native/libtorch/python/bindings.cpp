// pybind11 adapter over classify/runtime.h: types in, types out, the GIL released while C++
// decodes and runs models. Imported as classify_native._core (python/classify_native).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "classify/runtime.h"

namespace py = pybind11;
using classify::Result;
using classify::Runtime;

namespace {

using U8Array = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Pixels in: only uint8 is taken (a C-contiguous copy is made when strided). Anything else is
// refused, never cast: float images in 0..1 would silently become black, and values above 255
// would wrap. `layout` is e.g. "(N, H, W, 3)", `channel_axis` the axis that must hold 3.
U8Array uint8_pixels(const py::array& a, const char* what, const char* layout, py::ssize_t ndim,
                     py::ssize_t channel_axis) {
  if (a.dtype().kind() != 'u' || a.itemsize() != 1)
    throw py::type_error("[input] " + std::string(what) + " takes a uint8 " + layout + " RGB array (pixel values 0..255), got dtype " +
                         std::string(py::str(a.dtype())) + "; convert explicitly, e.g. "
                         "np.clip(a * 255, 0, 255).round().astype(np.uint8) for floats in 0..1, or "
                         "np.clip(a, 0, 255).astype(np.uint8) for values in 0..255");
  if (a.ndim() != ndim || a.shape(channel_axis) != 3)
    throw classify::OptionError(std::string(what) + " takes a uint8 " + layout + " RGB array, got shape " + shape_of(a) +
                                (a.ndim() == ndim ? "; axis " + std::to_string(channel_axis) +
                                                        " must hold the 3 RGB channels (drop alpha, repeat grey)"
                                                  : std::string()));
  return U8Array::ensure(a);
}

py::array_t<uint8_t> image_to_numpy(classify::Image img) {
  py::array_t<uint8_t> out({img.height, img.width, 3});
  std::memcpy(out.mutable_data(), img.pixels.data(), img.pixels.size());
  return out;
}

classify::Image numpy_to_image(const U8Array& a) {
  if (a.shape(0) == 0 || a.shape(1) == 0) throw classify::OptionError("empty image of shape " + shape_of(a));
  classify::Image img{static_cast<int>(a.shape(0)), static_cast<int>(a.shape(1)), {}};
  img.pixels.assign(a.data(), a.data() + a.size());
  return img;
}

std::vector<classify::View> views_from(const py::object& views) {
  if (py::isinstance<py::str>(views)) return classify::parse_tta_policy(views.cast<std::string>());
  std::vector<classify::View> out;
  for (const py::handle& v : views) {
    py::dict d = v.cast<py::dict>();
    classify::View view;
    if (d.contains("resize") && !d["resize"].is_none()) view.resize = d["resize"].cast<int>();
    if (d.contains("crop")) view.crop = d["crop"].cast<std::string>();
    if (d.contains("flip")) view.flip = d["flip"].cast<std::string>();
    out.push_back(view);
  }
  return out;
}

py::list views_to_list(const std::vector<classify::View>& views) {
  py::list out;
  for (const auto& v : views) {
    py::dict d;
    d["resize"] = v.resize ? py::object(py::int_(v.resize)) : py::object(py::none());
    d["crop"] = v.crop;
    d["flip"] = v.flip;
    out.append(d);
  }
  return out;
}

// One dict per input: {"path", "probs": (K,) float32 array or None, "topk": [...], "error"}.
py::list results_to_list(const Runtime& rt, const std::vector<Result>& results, int topk) {
  py::list out;
  for (const Result& r : results) {
    py::dict d;
    d["path"] = r.source;
    py::list top;
    if (r.ok()) {
      py::array_t<float> probs(static_cast<py::ssize_t>(r.probs.size()));
      std::memcpy(probs.mutable_data(), r.probs.data(), r.probs.size() * sizeof(float));
      d["probs"] = probs;
      for (const auto& t : rt.topk(r.probs, topk)) {
        py::dict e;
        e["index"] = t.index;
        e["label"] = t.label;
        e["prob"] = t.prob;
        top.append(e);
      }
      d["error"] = py::none();
    } else {
      d["probs"] = py::none();
      d["error"] = r.error;
    }
    d["topk"] = top;
    out.append(d);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Native (C++/libtorch) bundle runtime; see classify_native for the documented API.";
  auto base = py::register_exception<classify::Error>(m, "NativeError", PyExc_ValueError);
  py::register_exception<classify::BundleError>(m, "BundleError", base.ptr());
  py::register_exception<classify::ImageError>(m, "ImageError", base.ptr());
  py::register_exception<classify::OptionError>(m, "OptionError", base.ptr());

  m.def("decode_file", [](const std::string& path) {
    classify::Image img;
    {
      py::gil_scoped_release nogil;
      img = classify::decode_file(path);
    }
    return image_to_numpy(std::move(img));
  }, py::arg("path"), "Decode a JPEG/PNG file to an (H, W, 3) uint8 RGB array.");
  m.def("decode_bytes", [](const py::bytes& data, const std::string& name) {
    std::string bytes = data;
    classify::Image img;
    {
      py::gil_scoped_release nogil;
      img = classify::decode_bytes(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), name);
    }
    return image_to_numpy(std::move(img));
  }, py::arg("data"), py::arg("name") = "<bytes>", "Decode encoded JPEG/PNG bytes to (H, W, 3) uint8 RGB.");
  m.def("parse_tta_policy", [](const std::string& name) { return views_to_list(classify::parse_tta_policy(name)); },
        py::arg("name"));
  m.def("preprocess", [](const py::array& image_in, std::pair<int, int> crop_size, int resize_size,
                         const std::string& interpolation, const py::object& views, const std::string& kernel) {
    const U8Array image = uint8_pixels(image_in, "preprocess", "(H, W, 3)", 3, 2);
    classify::Preprocessing pre;
    pre.crop_h = crop_size.first;
    pre.crop_w = crop_size.second;
    pre.resize_size = resize_size;
    pre.interpolation = interpolation;
    pre.resize_kernel = kernel;
    std::vector<classify::View> vs = views_from(views);
    classify::Image img = numpy_to_image(image);
    std::vector<uint8_t> out;
    {
      py::gil_scoped_release nogil;
      out = classify::preprocess_views(img, pre, vs);
    }
    py::array_t<uint8_t> arr({static_cast<py::ssize_t>(vs.size()), py::ssize_t{3},
                              static_cast<py::ssize_t>(pre.crop_h), static_cast<py::ssize_t>(pre.crop_w)});
    std::memcpy(arr.mutable_data(), out.data(), out.size());
    return arr;
  }, py::arg("image"), py::arg("crop_size"), py::arg("resize_size"), py::arg("interpolation") = "bilinear",
     py::arg("views") = "none", py::arg("resize_kernel") = "float32",
     "(H, W, 3) uint8 -> (V, 3, ch, cw) uint8, as trainer.tta.apply_views.");
  m.def("file_sha256", &classify::file_sha256, py::arg("path"));

  py::class_<Runtime>(m, "Runtime")
      .def(py::init([](const std::string& bundle_dir, const std::string& format, const py::object& tta, int threads,
                       const std::string& device, int batch, const std::string& precision,
                       const std::vector<std::string>& trusted_keys, bool require_signature,
                       const std::string& expected_manifest_sha256) {
             classify::Options o;
             o.format = format;
             o.tta = tta.is_none() ? std::string() : tta.cast<std::string>();
             o.threads = threads;
             o.device = device;
             o.batch = batch;
             o.precision = precision;
             o.trusted_keys = trusted_keys;
             o.require_signature = require_signature;
             o.expected_manifest_sha256 = expected_manifest_sha256;
             py::gil_scoped_release nogil;
             return std::make_unique<Runtime>(bundle_dir, o);
           }),
           py::arg("bundle_dir"), py::arg("format") = "auto", py::arg("tta") = py::none(), py::arg("threads") = 0,
           py::arg("device") = "cpu", py::arg("batch") = 16, py::arg("precision") = "fp32",
           py::arg("trusted_keys") = std::vector<std::string>{}, py::arg("require_signature") = false,
           py::arg("expected_manifest_sha256") = "")
      .def_property_readonly("classes", &Runtime::classes)
      .def_property_readonly("kind", &Runtime::kind)
      .def_property_readonly("format", &Runtime::format)
      .def_property_readonly("device", &Runtime::device)
      .def_property_readonly("merge", &Runtime::merge)
      .def_property_readonly("views", [](const Runtime& rt) { return views_to_list(rt.views()); })
      .def_property_readonly("preprocessing", [](const Runtime& rt) {
        const auto& p = rt.preprocessing();
        py::dict d;
        d["crop_size"] = py::make_tuple(p.crop_h, p.crop_w);
        d["resize_size"] = p.resize_size;
        d["interpolation"] = p.interpolation;
        d["resize_kernel"] = p.resize_kernel;
        return d;
      })
      .def("predict_files", [](Runtime& rt, const std::vector<std::string>& paths, int topk) {
        std::vector<Result> r;
        {
          py::gil_scoped_release nogil;
          r = rt.predict_files(paths);
        }
        return results_to_list(rt, r, topk);
      }, py::arg("paths"), py::arg("topk") = 5)
      .def("predict_bytes", [](Runtime& rt, const std::vector<py::bytes>& blobs, int topk) {
        std::vector<std::string> data(blobs.begin(), blobs.end());
        std::vector<Result> r;
        {
          py::gil_scoped_release nogil;
          r = rt.predict_bytes(data);
        }
        return results_to_list(rt, r, topk);
      }, py::arg("blobs"), py::arg("topk") = 5)
      .def("predict_array", [](Runtime& rt, const py::array& images_in, int topk) {
        const U8Array images = uint8_pixels(images_in, "predict_array", "(N, H, W, 3)", 4, 3);
        std::vector<Result> r;
        {
          py::gil_scoped_release nogil;
          r = rt.predict_pixels(images.data(), static_cast<int>(images.shape(0)), static_cast<int>(images.shape(1)),
                                static_cast<int>(images.shape(2)));
        }
        return results_to_list(rt, r, topk);
      }, py::arg("images"), py::arg("topk") = 5)
      .def("run_preprocessed", [](Runtime& rt, const py::array& rows_in) {
        const U8Array rows = uint8_pixels(rows_in, "run_preprocessed", "(N, 3, H, W)", 4, 1);
        const auto& p = rt.preprocessing();
        if (rows.shape(2) != p.crop_h || rows.shape(3) != p.crop_w)
          throw classify::OptionError("run_preprocessed: expected (N, 3, " + std::to_string(p.crop_h) + ", " +
                                      std::to_string(p.crop_w) + "), got " + shape_of(rows) +
                                      "; preprocess with the bundle's crop size first");
        std::vector<float> out;
        const int n = static_cast<int>(rows.shape(0));
        {
          py::gil_scoped_release nogil;
          out = rt.run_preprocessed(rows.data(), n);
        }
        const py::ssize_t k = static_cast<py::ssize_t>(rt.classes().size());
        // The runtime checked the width at load; this guards the copy whatever happens upstream.
        if (out.size() != static_cast<size_t>(n) * static_cast<size_t>(k))
          throw classify::BundleError("run_preprocessed: the model returned " + std::to_string(out.size()) +
                                      " values for " + std::to_string(n) + " images of " + std::to_string(k) +
                                      " classes; the bundle's class list does not match its model");
        py::array_t<float> arr({static_cast<py::ssize_t>(n), k});
        std::memcpy(arr.mutable_data(), out.data(), out.size() * sizeof(float));
        return arr;
      }, py::arg("rows"), "(N, 3, ch, cw) uint8, already preprocessed -> (N, K) probabilities (no TTA).");
}
