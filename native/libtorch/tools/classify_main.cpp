// classify: run a bundle on images from the command line; one JSON line per image.
//   build/bin/classify --bundle bundles/digits --topk 3 img1.png img2.jpg
// Exit status: 0 all images ok, 1 some images failed, 2 bad arguments or bundle.
#include <algorithm>
#include <chrono>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "classify/runtime.h"

namespace {

const char* kUsage = R"(usage: classify --bundle DIR [options] IMAGE...

Classify JPEG/PNG images with an exported bundle (docs/BUNDLE.md); prints one JSON line per image:
  {"path": ..., "topk": [{"index": i, "label": ..., "prob": p}, ...], "error": null}

options:
  --bundle DIR        bundle folder (model or ensemble) written by 'python -m export'   (required)
  --format F          pt2 | torchscript (default: pt2 when the bundle has one this CPU can run)
  --tta POLICY        none | hflip | vflip | hvflip | five-crop | ten-crop | multiscale:S1,S2,...
                      (default: the bundle's own TTA views)
  --topk K            classes per image (default 5, capped at the number of classes)
  --batch N           images per forward pass (default 16; the bundle's max_batch caps rows)
  --threads N         intra-op CPU threads (default: torch's default)
  --device D          cpu | cuda | cuda:N (default cpu); cuda runs the bundle's CUDA artifacts
                      ('python -m export --device cuda')
  --precision P       fp32 | fp16 | bf16 (default fp32; fp16/bf16: CUDA variants from
                      'python -m export --device cuda --precision fp32 fp16')
  --trusted-key PUB   Ed25519 public key (PEM, 'python -m export keygen'); repeatable. The bundle's
                      signature.json, when present, must verify with one of them
  --require-signature refuse bundles not signed by a --trusted-key (docs/BUNDLE.md, Trust)
  --bench N           no images: time N runs on a synthetic batch of --batch images and print
                      latency percentiles (end to end and model only) as one JSON line
  -h, --help          this help

exit status: 0 all images classified, 1 some images failed (their line has "error"),
             2 bad arguments or an unusable bundle
)";

struct Args {
  std::string bundle;
  classify::Options options;
  int topk = 5;
  int bench = 0;
  std::vector<std::string> images;
};

int parse_int(const std::string& flag, const std::string& v, int min) {
  size_t used = 0;
  int x = 0;
  try {
    x = std::stoi(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || v.empty() || x < min)
    throw classify::OptionError(flag + " needs an integer >= " + std::to_string(min) + ", got '" + v + "'");
  return x;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw classify::OptionError(f + " needs a value (see --help)");
      return argv[++i];
    };
    if (f == "-h" || f == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (f == "--bundle") a.bundle = value();
    else if (f == "--format") {
      a.options.format = value();
      if (a.options.format != "pt2" && a.options.format != "torchscript")
        throw classify::OptionError("--format must be pt2 or torchscript, got '" + a.options.format + "'");
    } else if (f == "--tta") a.options.tta = value();
    else if (f == "--topk") a.topk = parse_int(f, value(), 1);
    else if (f == "--batch") a.options.batch = parse_int(f, value(), 1);
    else if (f == "--threads") a.options.threads = parse_int(f, value(), 1);
    else if (f == "--device") a.options.device = value();
    else if (f == "--precision") a.options.precision = value();
    else if (f == "--bench") a.bench = parse_int(f, value(), 1);
    else if (f == "--trusted-key") a.options.trusted_keys.push_back(value());
    else if (f == "--require-signature") a.options.require_signature = true;
    else if (f.rfind("--", 0) == 0 && f.size() > 2) throw classify::OptionError("unknown option " + f + " (see --help)");
    else a.images.push_back(f);
  }
  if (a.bundle.empty()) throw classify::OptionError("--bundle DIR is required (see --help)");
  if (a.images.empty() && a.bench == 0) throw classify::OptionError("no images given (see --help)");
  if (!a.images.empty() && a.bench > 0)
    throw classify::OptionError("--bench times a synthetic batch and takes no images; drop the image paths or --bench");
  return a;
}

nlohmann::json percentiles(std::vector<double> ms) {
  std::sort(ms.begin(), ms.end());
  auto at = [&](double q) { return ms[std::min(ms.size() - 1, static_cast<size_t>(q * (ms.size() - 1) + 0.5))]; };
  double mean = 0;
  for (double x : ms) mean += x / ms.size();
  return {{"p50", at(0.5)}, {"p90", at(0.9)}, {"p99", at(0.99)}, {"mean", mean}, {"min", ms.front()}};
}

int bench(classify::Runtime& rt, const Args& a) {
  using clock = std::chrono::steady_clock;
  const auto& pre = rt.preprocessing();
  const int n = a.options.batch;
  // Synthetic images a little larger than the resize size, so the resize really runs.
  const int h = pre.resize_size + pre.resize_size / 7 + 1, w = h * 4 / 3;
  std::mt19937 rng(0);
  std::vector<uint8_t> pixels(static_cast<size_t>(n) * h * w * 3);
  for (auto& p : pixels) p = static_cast<uint8_t>(rng() & 0xFF);
  std::vector<uint8_t> rows(static_cast<size_t>(n) * 3 * pre.crop_h * pre.crop_w);
  for (auto& p : rows) p = static_cast<uint8_t>(rng() & 0xFF);
  auto time = [&](auto&& fn) {
    fn();  // warm-up
    fn();
    std::vector<double> ms;
    for (int i = 0; i < a.bench; ++i) {
      auto t0 = clock::now();
      fn();
      ms.push_back(std::chrono::duration<double, std::milli>(clock::now() - t0).count());
    }
    return percentiles(ms);
  };
  // A synthetic image the runtime cannot take (e.g. TTA views larger than it) fails the whole run.
  for (const classify::Result& r : rt.predict_pixels(pixels.data(), n, h, w))
    if (!r.ok()) throw classify::ImageError("--bench: the synthetic " + std::to_string(h) + "x" + std::to_string(w) +
                                            " image fails (" + r.error + ")");
  nlohmann::json e2e = time([&] { rt.predict_pixels(pixels.data(), n, h, w); });
  // Model-only timing feeds one preprocessed batch to every model: not defined for an ensemble
  // whose members take different input sizes (null there; end to end still covers it).
  nlohmann::json model = nullptr;
  if (rt.uniform_input()) model = time([&] { rt.run_preprocessed(rows.data(), n); });
  nlohmann::json out = {{"batch", n}, {"iterations", a.bench}, {"image", {h, w}}, {"format", rt.format()}, {"device", rt.device()},
                        {"views", rt.views().size()}, {"threads", a.options.threads},
                        {"end_to_end_ms", e2e}, {"model_ms", model}};
  std::cout << out.dump() << std::endl;
  return 0;
}

int classify_images(classify::Runtime& rt, const Args& args) {
  int failed = 0;
  for (size_t s = 0; s < args.images.size(); s += static_cast<size_t>(args.options.batch)) {
    std::vector<std::string> chunk(args.images.begin() + s,
                                   args.images.begin() + std::min(args.images.size(), s + args.options.batch));
    for (const classify::Result& r : rt.predict_files(chunk)) {
      nlohmann::ordered_json line = {{"path", r.source}, {"topk", nlohmann::ordered_json::array()}, {"error", nullptr}};
      if (r.ok()) {
        for (const auto& t : rt.topk(r.probs, args.topk))
          line["topk"].push_back(nlohmann::ordered_json{{"index", t.index}, {"label", t.label}, {"prob", t.prob}});
      } else {
        line["error"] = r.error;
        ++failed;
      }
      std::cout << line.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) << "\n";
    }
    std::cout.flush();
  }
  if (failed) std::cerr << "classify: " << failed << " of " << args.images.size() << " images failed" << std::endl;
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Every path, --bench included, runs inside this one handler: a bad bundle, option or image
  // ends with one "classify: error: ..." line and exit status 2, never an uncaught exception.
  try {
    const Args args = parse_args(argc, argv);
    classify::Runtime rt(args.bundle, args.options);
    if (args.bench > 0) return bench(rt, args);
    return classify_images(rt, args);
  } catch (const std::exception& e) {
    std::cerr << "classify: error: " << e.what() << std::endl;
  } catch (...) {
    std::cerr << "classify: error: unknown failure (not a std::exception)" << std::endl;
  }
  return 2;
}
