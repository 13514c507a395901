// LwiSegment: the 3D Slicer CLI module that segments. Slicer runs it as
//   LwiSegment [--device D] [--overlap O] [--tta] INPUT OUTPUT MODEL
// after writing INPUT (NRRD in LPS by default, or .nii.gz as `fileExtensions` asks); it reads OUTPUT
// back into the node the user chose: a label map, or a segmentation whose segments the NRRD's
// segmentation fields name (the model's labels, colours, terminology). `--xml` prints the
// descriptor (LwiSegment.xml, installed beside the module so that Slicer never has to run it).
#include <cstring>
#include <iostream>

#include "LwiSegment_descriptor.h"
#include "cli_module.hpp"
#include "lwi.hpp"

int main(int argc, char **argv) {
  cli_module::Args args;
  try {
    args = cli_module::parse(argc, argv, kDescriptor, {"--model", "--device", "--overlap"}, {"--tta"});
  } catch (const std::exception &e) {
    std::cerr << "LwiSegment: " << e.what() << "\n";
    return 2;
  }
  auto &pos = args.positional;
  std::string model = args.get("--model", pos.size() > 2 ? pos[2] : "");
  if (pos.size() < 2 || model.empty() || pos.size() > 3) {
    std::cerr << "usage: LwiSegment [--device D] [--overlap O] [--tta] INPUT OUTPUT MODEL  (or --xml)\n";
    return 2;
  }
  try {
    double overlap = args.number("--overlap", 0.5);
    lwi::require_abi();
    cli_module::start("LwiSegment", "loading model");
    lwi::Engine engine("{\"device\": " + lwi::json_string(args.get("--device", "auto")) + "}");
    lwi::Model m(engine, model);
    // No manifest: Slicer deletes only the files it named, and OUTPUT.json would stay in its temp folder.
    std::string options = "{\"manifest\": false, \"overlap\": " + std::to_string(overlap) +
                          (args.switches.count("--tta") ? ", \"tta_axes\": [0, 1, 2]" : "") + "}";
    // Stages map onto one progress bar: preprocess 0-10%, inference 10-90%, resampling 90-100%.
    m.segment_file(pos[0], pos[1], options, [](const LwiProgress &p) {
      double f = 0;
      if (std::strcmp(p.stage, "preprocess") == 0) f = 0.1 * p.done;
      else if (std::strcmp(p.stage, "infer") == 0)
        f = 0.1 + 0.8 * (p.total ? double(p.done) / p.total : 1.0 - 1.0 / (1.0 + 0.05 * p.done));
      else if (std::strcmp(p.stage, "resample") == 0) f = 0.9 + 0.1 * p.done;
      cli_module::progress(f);
      return true;
    });
    cli_module::end("LwiSegment");
    return 0;
  } catch (const std::exception &e) {
    std::cerr << "LwiSegment: " << e.what() << "\n";
    return 1;
  }
}
