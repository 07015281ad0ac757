// Runtime: bundle -> models, and images -> probabilities (decode, TTA views, batched inference,
// view merge, ensemble fusion), with per-image errors.
#include <algorithm>
#include <filesystem>
#include <iostream>
#include <numeric>

#include <ATen/Parallel.h>

#include "internal.h"

namespace classify {
namespace fs = std::filesystem;

namespace {

struct LoadedModel {
  std::string name;
  double weight = 1.0;
  Preprocessing pre;
  int max_batch = 1;
  std::unique_ptr<Model> model;
};

bool same_pre(const Preprocessing& a, const Preprocessing& b) {
  return a.crop_h == b.crop_h && a.crop_w == b.crop_w && a.resize_size == b.resize_size &&
         a.interpolation == b.interpolation && a.resize_kernel == b.resize_kernel;
}

torch::Device parse_device(const std::string& s) {
  if (s == "cpu") return torch::Device(torch::kCPU);
  if (s == "cuda" || s.rfind("cuda:", 0) == 0) {
    const std::string index = s == "cuda" ? "0" : s.substr(5);
    if (index.empty() || index.size() > 3 || index.find_first_not_of("0123456789") != std::string::npos)
      throw OptionError("unknown device '" + s + "'; use cpu, cuda or cuda:N (N a device index)");
#ifndef CLASSIFY_WITH_CUDA
    throw OptionError("device '" + s + "' requested but this build has no CUDA support (the torch wheel it was "
                      "built against has no libtorch_cuda.so); install a CUDA torch wheel and rebuild, or use "
                      "--device cpu");
#endif
    const int64_t have = torch::cuda::is_available() ? static_cast<int64_t>(torch::cuda::device_count()) : 0;
    if (have == 0)
      throw OptionError("device '" + s + "' requested but no CUDA device is usable here (no GPU, driver or "
                        "CUDA runtime); use --device cpu");
    if (std::stoll(index) >= have)
      throw OptionError("device '" + s + "' requested but this machine has " + std::to_string(have) +
                        " CUDA device(s): use cuda:0.." + std::to_string(have - 1));
    return torch::Device("cuda:" + index);
  }
  throw OptionError("unknown device '" + s + "'; use cpu, cuda or cuda:N");
}

// One warm-up call at load time: a model whose output width is not the manifest's class count
// would give scores without names (and callers size buffers from the class list), so such a
// bundle is refused here rather than at the first image.
void check_output_width(Model& model, const Bundle& b, const Artifact& art, const torch::Device& device) {
  torch::Tensor out;
  try {
    c10::InferenceMode guard;
    out = model.run(torch::zeros({1, 3, b.pre.crop_h, b.pre.crop_w}, torch::kUInt8).to(device));
  } catch (const std::exception& e) {
    throw BundleError(b.dir + "/" + art.file + ": the model fails on a (1, 3, " + std::to_string(b.pre.crop_h) +
                      ", " + std::to_string(b.pre.crop_w) + ") uint8 warm-up batch (" +
                      std::string(e.what()).substr(0, 300) + "); re-export the bundle");
  }
  const int64_t k = static_cast<int64_t>(b.classes.size());
  if (out.dim() != 2 || out.size(0) != 1 || out.size(1) != k)
    throw BundleError("[classes] " + b.manifest_path + ": the manifest lists " + std::to_string(k) + " classes but the model " +
                      art.file + " outputs " + (out.dim() == 2 ? std::to_string(out.size(1)) + " scores per image"
                                                               : "a tensor of shape " + c10::str(out.sizes())) +
                      "; the class list must match the model's output: re-export the bundle");
}

}  // namespace

struct Runtime::Impl {
  Bundle bundle;
  Options options;
  torch::Device device{torch::kCPU};
  std::string format;
  std::vector<View> views;
  std::string merge;
  std::vector<LoadedModel> models;  // one for a model bundle, one per member for an ensemble

  // The artifact compiled for this device kind and precision (the manifest's "device" field):
  // a CPU .pt2 cannot run on CUDA, and a CUDA one not on the CPU.
  const Artifact& pick(const Bundle& b) const {
    const std::string dev = device.is_cuda() ? "cuda" : "cpu";
    std::string fmt = options.format;
    std::string skipped;  // why the bundle's .pt2 cannot run here (auto falls back to TorchScript)
    if (fmt == "auto") {  // pt2 when the bundle has one for this device that this CPU can run, else TorchScript
      for (const char* f : {"pt2", "torchscript"}) {
        const Artifact* a = b.find(f, dev, options.precision);
        if (a && (skipped = pt2_problem(b, *a)).empty()) return *a;
        if (a) std::cerr << "classify: skipping the .pt2: " << skipped << "; using TorchScript instead\n";
      }
      fmt = "";
    } else if (const Artifact* a = b.find(fmt, dev, options.precision)) {
      // Checked before opening: a package built for a newer CPU dies with SIGILL, not an exception.
      if (std::string why = pt2_problem(b, *a); !why.empty()) throw BundleError(why);
      return *a;
    }
    if (!skipped.empty())
      throw BundleError(skipped + "; the bundle has no TorchScript artifact to fall back to (re-export it with "
                                  "'python -m export ... --format torchscript pt2')");
    std::string have;
    for (const Artifact& x : b.artifacts)
      have += (have.empty() ? "" : ", ") + x.key + " (" + x.device + ", " + x.precision + ")";
    std::string fix = dev == "cuda"
        ? "re-export on a GPU machine with 'python -m export ... --device cuda" +
              (options.precision == "fp32" ? std::string() : " --precision fp32 " + options.precision) +
              "', or use --device cpu"
        : "re-export with 'python -m export ... --format " + (fmt.empty() ? "all" : fmt) + "'" +
              (options.precision == "fp32" ? std::string() : ", or drop --precision (CPU artifacts are fp32)");
    const std::string what = fmt.empty() ? "'pt2' or 'torchscript'" : "'" + fmt + "'";
    throw BundleError(b.dir + ": the bundle has no " + what + " artifact for " + dev + " in " + options.precision +
                      " (it has: " + have + "); " + fix);
  }

  void load(const Bundle& b, const std::string& name, double weight) {
    const Artifact& art = pick(b);
    const std::string fmt = art.format == "aotinductor" ? "pt2" : art.format;
    const std::string bytes = read_checked_artifact(b, art.key);
    LoadedModel m{name, weight, b.pre, b.max_batch, load_model(bytes, (fs::path(b.dir) / art.file).string(), art, device)};
    check_output_width(*m.model, b, art, device);
    models.push_back(std::move(m));
    if (format.empty()) format = fmt;
    else if (format != fmt) format = "mixed";
  }

  // (R, 3, h, w) uint8 on CPU -> (R, K) float32 on CPU, in pieces of at most max_batch rows.
  torch::Tensor run_rows(LoadedModel& m, const torch::Tensor& rows) {
    c10::InferenceMode guard;
    std::vector<torch::Tensor> outs;
    for (int64_t s = 0; s < rows.size(0); s += m.max_batch) {
      torch::Tensor piece = rows.slice(0, s, std::min<int64_t>(rows.size(0), s + m.max_batch)).to(device);
      outs.push_back(m.model->run(piece).to(torch::kCPU, torch::kFloat32));
    }
    return torch::cat(outs);
  }

  // Member probabilities (M, N, K) -> (N, K) by the ensemble's fusion rule.
  torch::Tensor fuse(const std::vector<torch::Tensor>& per_model) {
    if (models.size() == 1) return per_model[0];
    torch::Tensor p = torch::stack(per_model);
    std::vector<double> w;
    for (const LoadedModel& m : models) w.push_back(bundle.fusion == "mean" ? 1.0 : m.weight);
    double total = std::accumulate(w.begin(), w.end(), 0.0);
    torch::Tensor wt = torch::tensor(w, torch::kFloat64).div(total).to(torch::kFloat32).view({-1, 1, 1});
    if (bundle.fusion == "vote") {
      // weighted majority of member top-1, as vote fractions; argmax of the fractions ties low
      torch::Tensor onehot = torch::one_hot(p.argmax(-1), p.size(-1)).to(torch::kFloat32);
      return (onehot * wt).sum(0);
    }
    return (p * wt).sum(0);
  }
};

Runtime::Runtime(const std::string& bundle_dir, const Options& options) : impl_(std::make_unique<Impl>()) {
  Impl& d = *impl_;
  d.options = options;
  if (options.batch < 1) throw OptionError("batch must be at least 1, got " + std::to_string(options.batch));
  if (options.threads < 0) throw OptionError("threads must be >= 0, got " + std::to_string(options.threads));
  if (options.format != "auto" && options.format != "pt2" && options.format != "torchscript")
    throw OptionError("unknown format '" + options.format + "'; use pt2, torchscript or auto");
  if (options.precision != "fp32" && options.precision != "fp16" && options.precision != "bf16")
    throw OptionError("unknown precision '" + options.precision + "'; use fp32, fp16 or bf16");
  d.device = parse_device(options.device);
  if (options.threads > 0) torch::set_num_threads(options.threads);
  d.bundle = read_bundle(bundle_dir);
  if (!options.expected_manifest_sha256.empty() &&
      sha256_hex(d.bundle.manifest_bytes) != options.expected_manifest_sha256)
    throw BundleError("[integrity] " + d.bundle.manifest_path + ": changed after the caller checked it (sha256 differs); something is "
                      "rewriting the bundle while it loads: copy it again and load it from a folder nobody else writes");
  // members are covered through their manifest_sha256, which read_bundle requires and checks
  check_signature(d.bundle, options.trusted_keys, options.require_signature);
  d.views = options.tta.empty() ? d.bundle.tta_views : parse_tta_policy(options.tta);
  d.merge = d.bundle.tta_merge;
  if (d.bundle.kind == "model") {
    d.load(d.bundle, d.bundle.name, 1.0);
  } else {
    for (const Member& m : d.bundle.members) d.load(m.bundle, m.name, m.weight);
  }
  for (const LoadedModel& m : d.models) check_views(d.views, m.pre, d.bundle.manifest_path + " (" + m.name + ")");
}

Runtime::~Runtime() = default;
Runtime::Runtime(Runtime&&) noexcept = default;
Runtime& Runtime::operator=(Runtime&&) noexcept = default;

const std::vector<std::string>& Runtime::classes() const { return impl_->bundle.classes; }
const Preprocessing& Runtime::preprocessing() const { return impl_->models.front().pre; }
std::string Runtime::kind() const { return impl_->bundle.kind; }
std::string Runtime::format() const { return impl_->format; }
std::string Runtime::device() const { return impl_->device.str(); }
const std::vector<View>& Runtime::views() const { return impl_->views; }
std::string Runtime::merge() const { return impl_->merge; }
bool Runtime::uniform_input() const {
  const auto& ms = impl_->models;
  return std::all_of(ms.begin(), ms.end(), [&](const LoadedModel& m) { return same_pre(m.pre, ms.front().pre); });
}

std::vector<Result> Runtime::predict_images(std::vector<Image> images, std::vector<std::string> sources,
                                            std::vector<std::string> errors) {
  Impl& d = *impl_;
  const int64_t n = static_cast<int64_t>(images.size());
  errors.resize(n);
  sources.resize(n);
  std::vector<Result> results(n);
  const int64_t V = static_cast<int64_t>(d.views.size());
  // Distinct preprocessings among the models (ensemble members usually share one).
  std::vector<int> pre_of(d.models.size());
  std::vector<const Preprocessing*> pres;
  for (size_t i = 0; i < d.models.size(); ++i) {
    auto it = std::find_if(pres.begin(), pres.end(), [&](const Preprocessing* p) { return same_pre(*p, d.models[i].pre); });
    pre_of[i] = static_cast<int>(it - pres.begin());
    if (it == pres.end()) pres.push_back(&d.models[i].pre);
  }
  const int64_t chunk = std::max(1, d.options.batch);
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t e = std::min(n, s + chunk);
    // views[p][i]: (V, 3, h, w) uint8 for image i under preprocessing p; decode/resize in parallel.
    std::vector<std::vector<torch::Tensor>> views(pres.size(), std::vector<torch::Tensor>(e - s));
    at::parallel_for(s, e, 1, [&](int64_t b, int64_t en) {
      for (int64_t i = b; i < en; ++i) {
        if (!errors[i].empty()) continue;
        try {
          torch::Tensor chw = image_to_chw(images[i]);
          for (size_t p = 0; p < pres.size(); ++p) views[p][i - s] = apply_views(chw, *pres[p], d.views);
        } catch (const std::exception& ex) {
          errors[i] = sources[i] + ": cannot preprocess (" + ex.what() + ")";
        }
        images[i] = Image{};  // free the decoded pixels early
      }
    });
    std::vector<int64_t> good;
    for (int64_t i = s; i < e; ++i)
      if (errors[i].empty()) good.push_back(i);
    for (int64_t i = s; i < e; ++i) results[i] = Result{sources[i], {}, errors[i]};
    if (good.empty()) continue;
    std::vector<torch::Tensor> per_model;
    for (size_t mi = 0; mi < d.models.size(); ++mi) {
      std::vector<torch::Tensor> stack;
      for (int64_t i : good) stack.push_back(views[pre_of[mi]][i - s]);
      torch::Tensor rows = torch::cat(stack);  // (G*V, 3, h, w)
      torch::Tensor probs = d.run_rows(d.models[mi], rows);
      const int64_t G = static_cast<int64_t>(good.size());
      probs = probs.view({G, V, -1}).transpose(0, 1);  // (V, G, K)
      per_model.push_back(merge_probs(probs, d.merge));
    }
    torch::Tensor fused = d.fuse(per_model).contiguous();  // (G, K)
    const int64_t K = fused.size(1);
    const float* p = fused.data_ptr<float>();
    for (size_t g = 0; g < good.size(); ++g) results[good[g]].probs.assign(p + g * K, p + (g + 1) * K);
  }
  return results;
}

std::vector<Result> Runtime::predict_files(const std::vector<std::string>& paths) {
  std::vector<Image> images(paths.size());
  std::vector<std::string> errors(paths.size());
  at::parallel_for(0, static_cast<int64_t>(paths.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      try {
        images[i] = decode_file(paths[i]);
      } catch (const std::exception& ex) {
        errors[i] = ex.what();
      }
    }
  });
  return predict_images(std::move(images), paths, std::move(errors));
}

std::vector<Result> Runtime::predict_bytes(const std::vector<std::string>& blobs) {
  std::vector<Image> images(blobs.size());
  std::vector<std::string> errors(blobs.size()), sources(blobs.size());
  for (size_t i = 0; i < blobs.size(); ++i) sources[i] = "<bytes #" + std::to_string(i) + ">";
  at::parallel_for(0, static_cast<int64_t>(blobs.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      try {
        images[i] = decode_bytes(reinterpret_cast<const uint8_t*>(blobs[i].data()), blobs[i].size(), sources[i]);
      } catch (const std::exception& ex) {
        errors[i] = ex.what();
      }
    }
  });
  return predict_images(std::move(images), std::move(sources), std::move(errors));
}

std::vector<Result> Runtime::predict_pixels(const uint8_t* nhwc, int n, int height, int width) {
  if (n < 0 || height <= 0 || width <= 0) throw OptionError("predict_pixels needs (N, H, W, 3) with H, W > 0");
  std::vector<Image> images(n);
  std::vector<std::string> sources(n);
  const size_t per = static_cast<size_t>(height) * width * 3;
  for (int i = 0; i < n; ++i) {
    images[i] = Image{height, width, std::vector<uint8_t>(nhwc + i * per, nhwc + (i + 1) * per)};
    sources[i] = "<array #" + std::to_string(i) + ">";
  }
  return predict_images(std::move(images), std::move(sources));
}

std::vector<float> Runtime::run_preprocessed(const uint8_t* n3hw, int n) {
  Impl& d = *impl_;
  const Preprocessing& pre = d.models.front().pre;
  torch::Tensor rows = torch::from_blob(const_cast<uint8_t*>(n3hw), {n, 3, pre.crop_h, pre.crop_w}, torch::kUInt8);
  std::vector<torch::Tensor> per_model;
  for (LoadedModel& m : d.models) {
    if (!same_pre(m.pre, pre)) throw OptionError("run_preprocessed: ensemble members have different input sizes");
    per_model.push_back(d.run_rows(m, rows));
  }
  torch::Tensor fused = d.fuse(per_model).contiguous();
  return std::vector<float>(fused.data_ptr<float>(), fused.data_ptr<float>() + fused.numel());
}

std::vector<TopK> Runtime::topk(const std::vector<float>& probs, int k) const {
  std::vector<int> idx(probs.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return probs[a] > probs[b]; });
  idx.resize(std::min<size_t>(idx.size(), static_cast<size_t>(std::max(k, 0))));
  std::vector<TopK> out;
  for (int i : idx) out.push_back(TopK{i, impl_->bundle.classes.at(i), probs[i]});
  return out;
}

}  // namespace classify
