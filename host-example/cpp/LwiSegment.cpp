// LwiSegment: the 3D Slicer CLI module. Slicer runs it as
//   LwiSegment [--device D] [--overlap O] [--tta] INPUT OUTPUT MODEL
// after writing INPUT (NRRD in LPS by default, or .nii.gz as `fileExtensions` asks); it reads OUTPUT, a
// label map on INPUT's grid. `--xml` prints the module descriptor. Progress goes to stdout as
// <filter-progress> lines; errors go to stderr with a non-zero exit. Slicer cancels by killing the process:
// outputs are written under a temporary name, so nothing partial is left.
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

#include "lwi.hpp"

static const char *kDescriptor = R"(<?xml version="1.0" encoding="utf-8"?>
<executable>
  <category>Segmentation</category>
  <title>LWI Segment</title>
  <description><![CDATA[Segments a CT volume with an lwi model (UNETR with learnable weight initialization). The label map lands on the input's own grid.]]></description>
  <version>0.1.0</version>
  <documentation-url>https://example.invalid/lwi</documentation-url>
  <license>Apache-2.0</license>
  <contributor>lwi developers</contributor>
  <parameters>
    <label>IO</label>
    <description><![CDATA[Input and output volumes]]></description>
    <image fileExtensions=".nrrd,.nii.gz">
      <name>inputVolume</name>
      <label>Input volume</label>
      <channel>input</channel>
      <index>0</index>
      <description><![CDATA[CT volume to segment]]></description>
    </image>
    <image type="label" reference="inputVolume" fileExtensions=".nrrd,.nii.gz">
      <name>outputVolume</name>
      <label>Output label map</label>
      <channel>output</channel>
      <index>1</index>
      <description><![CDATA[Label map on the input's grid]]></description>
    </image>
  </parameters>
  <parameters>
    <label>Model and inference</label>
    <description><![CDATA[How to segment]]></description>
    <file fileExtensions=".safetensors">
      <name>model</name>
      <label>Model file</label>
      <channel>input</channel>
      <index>2</index>
      <description><![CDATA[An lwi model file (.safetensors, stage segmentation)]]></description>
    </file>
    <string>
      <name>device</name>
      <longflag>device</longflag>
      <label>Device</label>
      <description><![CDATA[auto (the first GPU when there is one), cpu or cuda:N]]></description>
      <default>auto</default>
    </string>
    <float>
      <name>overlap</name>
      <longflag>overlap</longflag>
      <label>Window overlap</label>
      <description><![CDATA[Fraction of each sliding window shared with its neighbours]]></description>
      <default>0.5</default>
      <constraints><minimum>0</minimum><maximum>0.9</maximum><step>0.05</step></constraints>
    </float>
    <boolean>
      <name>tta</name>
      <longflag>tta</longflag>
      <label>Mirror test-time augmentation</label>
      <description><![CDATA[Average over mirrorings of the three axes (slower)]]></description>
      <default>false</default>
    </boolean>
  </parameters>
</executable>
)";

int main(int argc, char **argv) {
  std::string model, device = "auto", input, output;
  double overlap = 0.5;
  bool tta = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char *flag) -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(std::string(flag) + " needs a value");
      return argv[++i];
    };
    if (a == "--xml") {
      std::fputs(kDescriptor, stdout);
      return 0;
    } else if (a == "--model") {
      model = value("--model");
    } else if (a == "--device") {
      device = value("--device");
    } else if (a == "--overlap") {
      overlap = std::stod(value("--overlap"));
    } else if (a == "--tta") {
      tta = true;  // Slicer passes a boolean's flag alone when it is true
    } else if (a == "--processinformationaddress" || a == "--returnparameterfile") {
      ++i;  // Slicer's shared-memory and return-parameter plumbing: not used here
    } else if (input.empty()) {
      input = a;
    } else if (output.empty()) {
      output = a;
    } else if (model.empty()) {
      model = a;
    } else {
      std::cerr << "LwiSegment: unexpected argument " << a << "\n";
      return 2;
    }
  }
  if (model.empty() || input.empty() || output.empty()) {
    std::cerr << "usage: LwiSegment [--device D] [--overlap O] [--tta] INPUT OUTPUT MODEL  (or --xml)\n";
    return 2;
  }
  try {
    lwi::require_abi();
    std::printf("<filter-start><filter-name>LwiSegment</filter-name><filter-comment>loading model</filter-comment></filter-start>\n");
    std::fflush(stdout);
    lwi::Engine engine("{\"device\": \"" + device + "\"}");
    lwi::Model m(engine, model);
    std::string options = "{\"overlap\": " + std::to_string(overlap) + (tta ? ", \"tta_axes\": [0, 1, 2]" : "") + "}";
    // Stages map onto one progress bar: preprocess 0-10%, inference 10-90%, resampling 90-100%.
    m.segment_file(input, output, options, [](const LwiProgress &p) {
      double f = 0;
      if (std::strcmp(p.stage, "preprocess") == 0) f = 0.1 * p.done;
      else if (std::strcmp(p.stage, "infer") == 0) f = 0.1 + 0.8 * (1.0 - 1.0 / (1.0 + 0.05 * p.done));
      else if (std::strcmp(p.stage, "resample") == 0) f = 0.9 + 0.1 * p.done;
      std::printf("<filter-stage-progress>%.3f</filter-stage-progress>\n<filter-progress>%.3f</filter-progress>\n", f, f);
      std::fflush(stdout);
      return true;
    });
    std::printf("<filter-end><filter-name>LwiSegment</filter-name></filter-end>\n");
    return 0;
  } catch (const std::exception &e) {
    std::cerr << "LwiSegment: " << e.what() << "\n";
    return 1;
  }
}
