/* A C host that dlopens liblwi.so, checks the ABI version, reads a volume, and calls every entry
 * point with NULL and invalid arguments: each must answer with a status code and a message, never
 * a crash. With a segmentation model it also abuses lwi_segment and segments from two threads.
 * Usage: abi_misuse LIBLWI.so VOLUME.nii.gz SCRATCH_DIR [MODEL.safetensors] */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "lwi.h"

static int passed, failed;

#define CHECK(cond, ...)                                    \
  do {                                                      \
    if (cond) {                                             \
      passed++;                                             \
    } else {                                                \
      failed++;                                             \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);  \
      fprintf(stderr, __VA_ARGS__);                         \
      fputc('\n', stderr);                                  \
    }                                                       \
  } while (0)

/* Every entry point, resolved by name as a dlopen host does. */
static struct {
  uint32_t (*abi_version)(void);
  const char *(*last_error)(void);
  const char *(*version_json)(void);
  LwiStatus (*volume_convert)(const char *, const char *);
  LwiStatus (*volume_read)(const char *, LwiVolumeHandle **);
  LwiStatus (*volume_read_series)(const char *, const char *, LwiVolumeHandle **);
  LwiStatus (*dicom_series_json)(const char *, char **);
  LwiStatus (*volume_read_dicom_files)(const char *const *, size_t, const char *, LwiVolumeHandle **);
  LwiStatus (*volume_write)(const LwiVolumeHandle *, const char *);
  LwiStatus (*volume_write_lent)(const LwiVolume *, const char *);
  LwiStatus (*volume_dims)(const LwiVolumeHandle *, int64_t *);
  LwiStatus (*volume_dtype)(const LwiVolumeHandle *, LwiDtype *);
  LwiStatus (*volume_affine)(const LwiVolumeHandle *, int32_t, double *);
  LwiStatus (*volume_copy_voxels)(const LwiVolumeHandle *, void *, size_t);
  void (*volume_free)(LwiVolumeHandle *);
  LwiStatus (*phantom_dataset)(const char *, const char *);
  LwiStatus (*engine_create)(const char *, LwiEngine **);
  void (*engine_free)(LwiEngine *);
  LwiStatus (*model_load)(const LwiEngine *, const char *, LwiModel **);
  const char *(*model_info_json)(const LwiModel *);
  void (*model_free)(LwiModel *);
  LwiStatus (*model_import)(const char *, const char *, const char *);
  LwiStatus (*segment)(const LwiModel *, const LwiVolume *, void *, int32_t, size_t, const char *, LwiProgressFn, void *);
  LwiStatus (*segment_file)(const LwiModel *, const char *, const char *, const char *, LwiProgressFn, void *);
  LwiStatus (*evaluate)(const char *, const char *, const char *, char **);
  void (*string_free)(char *);
  LwiStatus (*init_train)(const LwiEngine *, const char *, LwiProgressFn, void *);
  LwiStatus (*fine_tune)(const LwiEngine *, const char *, LwiProgressFn, void *);
  LwiStatus (*forward)(const LwiModel *, const char *, const char *, const char *);
} lwi;

static void *need(void *lib, const char *name) {
  void *f = dlsym(lib, name);
  if (!f) {
    fprintf(stderr, "missing symbol %s\n", name);
    exit(2);
  }
  return f;
}

/* A failing call must leave a message that names the call. */
static void expect(LwiStatus got, LwiStatus want, const char *what) {
  const char *msg = lwi.last_error();
  CHECK(got == want, "%s: status %d, expected %d (%s)", what, got, want, msg);
  CHECK(msg != NULL && (want == LWI_STATUS_OK ? msg[0] == '\0' : strlen(msg) > 0), "%s: message '%s'", what,
        msg ? msg : "(null)");
}

/* A small volume lent to lwi_segment: a bright box in soft tissue, 4 mm voxels, RAS. */
enum { NX = 20, NY = 18, NZ = 12 };
static float voxels_lent[NX * NY * NZ];

static LwiVolume lent_volume(void) {
  for (int i = 0; i < NX * NY * NZ; i++) voxels_lent[i] = (i % NX > 6 && i % NX < 14) ? 300.0f : 0.0f;
  LwiVolume v = {sizeof(LwiVolume), LWI_DTYPE_FLOAT32, {NX, NY, NZ}, voxels_lent,
                 {4, 0, 0, -40, 0, 4, 0, -36, 0, 0, 4, -24, 0, 0, 0, 1}, LWI_SPACE_RAS};
  return v;
}

struct job {
  const LwiModel *model;
  uint8_t labels[NX * NY * NZ];
  LwiStatus status;
  int own_error_kept;
};

/* Segments the lent volume; first makes a failing call and checks, after segmenting, that this
 * thread's last error was not disturbed by the other thread. */
static void *segment_job(void *arg) {
  struct job *j = arg;
  LwiVolume v = lent_volume();
  LwiVolumeHandle *h = NULL;
  lwi.volume_read("/nonexistent/thread.nii", &h);
  char mine[256];
  snprintf(mine, sizeof mine, "%s", lwi.last_error());
  j->status = lwi.segment(j->model, &v, j->labels, LWI_DTYPE_UINT8, sizeof j->labels, "{\"overlap\": 0.25}", NULL, NULL);
  j->own_error_kept = j->status == LWI_STATUS_OK && strlen(lwi.last_error()) == 0 && strstr(mine, "thread.nii") != NULL;
  return NULL;
}

/* Freeing a model while another thread segments with it: the call in flight keeps the model until
 * it returns. The callback holds the segmenting thread until the main thread has freed the model. */
static volatile int in_flight, freed;

static int32_t hold_until_freed(void *user, const struct LwiProgress *p) {
  (void)user;
  (void)p;
  in_flight = 1;
  while (!freed) {
    struct timespec ms = {0, 1000000};
    nanosleep(&ms, NULL);
  }
  return 0;
}

static void *segment_while_freed(void *arg) {
  struct job *j = arg;
  LwiVolume v = lent_volume();
  j->status = lwi.segment(j->model, &v, j->labels, LWI_DTYPE_UINT8, sizeof j->labels, "{\"overlap\": 0.25}",
                          hold_until_freed, NULL);
  return NULL;
}

/* Inputs that used to hang, read without bound or mislead: each is a prompt, clear error. */
static void hostile_input(const char *scratch);

static void robustness(const char *volume_path, const char *scratch) {
  char path[4096];
  LwiVolumeHandle *h = NULL;
  /* The message of a failed call survives frees and getters made after it. */
  expect(lwi.volume_read("/nonexistent/kept.nii", &h), LWI_STATUS_IO, "read(missing)");
  LwiEngine *engine = NULL;
  lwi.engine_free(engine);
  lwi.volume_free(NULL);
  (void)lwi.version_json();
  (void)lwi.model_info_json(NULL);
  CHECK(strstr(lwi.last_error(), "kept.nii") != NULL, "frees and getters keep the last error: %s", lwi.last_error());
  /* A FIFO, as a volume and inside a DICOM folder: refused, not waited on. */
  snprintf(path, sizeof path, "%s/fifo.nii", scratch);
  mkfifo(path, 0600);
  expect(lwi.volume_read(path, &h), LWI_STATUS_INVALID_ARGUMENT, "read(a FIFO)");
  CHECK(strstr(lwi.last_error(), "FIFO") != NULL, "the FIFO is named: %s", lwi.last_error());
  char *listing = NULL;
  expect(lwi.dicom_series_json(scratch, &listing), LWI_STATUS_OK, "dicom_series_json(folder with a FIFO)");
  CHECK(listing && strstr(listing, "not a regular file"), "the FIFO is skipped: %s", listing ? listing : "(null)");
  lwi.string_free(listing);
  unlink(path);
  /* A .nii.gz that is /dev/zero, and a folder that links to itself. */
  snprintf(path, sizeof path, "%s/zero.nii.gz", scratch);
  symlink("/dev/zero", path);
  expect(lwi.volume_read(path, &h), LWI_STATUS_INVALID_ARGUMENT, "read(-> /dev/zero)");
  unlink(path);
  snprintf(path, sizeof path, "%s/loop", scratch);
  mkdir(path, 0700);
  char link[4200];
  snprintf(link, sizeof link, "%s/self", path);
  symlink(".", link);
  snprintf(link, sizeof link, "%s/up", path);
  symlink("..", link);
  expect(lwi.volume_read_series(path, NULL, &h), LWI_STATUS_FORMAT, "read_series(folder of self-links)");
  /* A valid volume under a name that is not UTF-8. */
  snprintf(path, sizeof path, "%s/caf\xe9.nii.gz", scratch);
  expect(lwi.volume_convert(volume_path, path), LWI_STATUS_OK, "convert(-> non-UTF-8 name)");
  expect(lwi.volume_read(path, &h), LWI_STATUS_OK, "read(non-UTF-8 name)");
  lwi.volume_free(h);
  unlink(path);
  hostile_input(scratch);
}

/* Input crafted to take the host down: each is an error the host can show, the process lives on. */
static void hostile_input(const char *scratch) {
  LwiEngine *engine = NULL;
  expect(lwi.engine_create("{\"device\": \"cpu\", \"device\": \"cpu\"}", &engine), LWI_STATUS_INVALID_ARGUMENT,
         "engine_create(a key twice)");
  CHECK(strstr(lwi.last_error(), "duplicate key \"device\"") != NULL, "the key is named: %s", lwi.last_error());
  size_t n = 1u << 20;
  char *options = malloc(n + 16);
  memset(options, 'k', n + 16);
  memcpy(options, "{\"", 2);
  memcpy(options + n + 2, "\": 1}", 6);
  options[n + 8] = '\0';
  expect(lwi.engine_create(options, &engine), LWI_STATUS_INVALID_ARGUMENT, "engine_create(a 1 MB key)");
  CHECK(strlen(lwi.last_error()) < 1000, "the key is quoted, not echoed: %zu bytes", strlen(lwi.last_error()));
  free(options);
  /* A DICOM file whose sequences nest 10,000 deep (a stack overflow for a recursive reader). */
  char path[4096];
  snprintf(path, sizeof path, "%s/deep.dcm", scratch);
  FILE *f = fopen(path, "wb");
  static const unsigned char meta[] = {'D', 'I', 'C', 'M', 2, 0, 0, 0, 'U', 'L', 4, 0, 28, 0, 0, 0, 2, 0, 0x10, 0,
                                       'U', 'I', 20, 0, '1', '.', '2', '.', '8', '4', '0', '.', '1', '0', '0', '0',
                                       '8', '.', '1', '.', '2', '.', '1', 0};
  static const unsigned char open[] = {8, 0, 0x40, 0x11, 'S', 'Q', 0, 0, 0xff, 0xff, 0xff, 0xff,
                                       0xfe, 0xff, 0, 0xe0, 0xff, 0xff, 0xff, 0xff};
  static const unsigned char close[] = {0xfe, 0xff, 0x0d, 0xe0, 0, 0, 0, 0, 0xfe, 0xff, 0xdd, 0xe0, 0, 0, 0, 0};
  static const unsigned char preamble[128];
  fwrite(preamble, 1, sizeof preamble, f);
  fwrite(meta, 1, sizeof meta, f);
  for (int i = 0; i < 10000; i++) fwrite(open, 1, sizeof open, f);
  for (int i = 0; i < 10000; i++) fwrite(close, 1, sizeof close, f);
  fclose(f);
  LwiVolumeHandle *h = NULL;
  expect(lwi.volume_read(path, &h), LWI_STATUS_FORMAT, "read(DICOM nested 10,000 deep)");
  CHECK(strstr(lwi.last_error(), "nested more than 64 deep") != NULL, "the nesting is named: %s", lwi.last_error());
  unlink(path);
}

/* Cancels when inference is over: the preprocessed volume is ready by then. */
static int32_t cancel_at_resample(void *user, const struct LwiProgress *p) {
  (void)user;
  return strcmp(p->stage, "resample") == 0;
}

/* A model file of a header alone: `doc` (single quotes for double) as its "lwi" metadata. */
static void write_header_only_model(const char *path, const char *doc) {
  char header[4096];
  size_t n = (size_t)snprintf(header, sizeof header, "{\"__metadata__\":{\"lwi\":\"");
  for (const char *c = doc; *c && n < sizeof header - 8; c++) {
    if (*c == '\'') header[n++] = '\\', header[n++] = '"';
    else header[n++] = *c;
  }
  n += (size_t)snprintf(header + n, sizeof header - n, "\"}}");
  uint64_t len = n;
  FILE *f = fopen(path, "wb");
  unsigned char prefix[8];
  for (int i = 0; i < 8; i++) prefix[i] = (unsigned char)(len >> (8 * i));
  fwrite(prefix, 1, 8, f);
  fwrite(header, 1, n, f);
  fclose(f);
}

/* Model files from elsewhere: absurd metadata, weights that are not numbers, a 100 MB label name. Each is
 * refused before anything is built, naming the file and the field (num_layers 10^9 used to abort the host). */
static void hostile_models(const LwiEngine *engine, const char *scratch, const char *model_path, const char *volume_path) {
  static const char *base = "{'format': 'lwi-model', 'format_version': 2, 'arch': 'unetr', 'config': {'img_size': "
                            "%s, 'feature_size': 8, 'hidden_size': %s, 'mlp_dim': 96, 'num_heads': 4, 'num_layers': "
                            "%s, 'out_channels': 3}, 'order_classes': %s, 'labels': {}, 'preprocessing': {'orientation': "
                            "'RAS', 'spacing': %s, 'intensity_window': [-175.0, 250.0], 'roi_size': [32, 32, 32], "
                            "'crop_foreground': true}, 'stage': 'segmentation', 'provenance': {}}";
  const struct {
    const char *img, *hidden, *layers, *order, *spacing, *field;
  } cases[] = {
      {"[32, 32, 32]", "48", "1000000000", "null", "[1.5, 1.5, 2.0]", "num_layers"},
      {"[16384, 16384, 16384]", "48", "12", "null", "[1.5, 1.5, 2.0]", "img_size"},
      {"[32, 32, 32]", "1000000", "12", "null", "[1.5, 1.5, 2.0]", "hidden_size"},
      {"[32, 32, 32]", "48", "12", "4611686018427387904", "[1.5, 1.5, 2.0]", "order_classes"},
      {"[32, 32, 32]", "48", "12", "null", "[1e-6, 1.5, 2.0]", "spacing"},
  };
  char doc[2048], path[4096];
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    snprintf(doc, sizeof doc, base, cases[i].img, cases[i].hidden, cases[i].layers, cases[i].order, cases[i].spacing);
    snprintf(path, sizeof path, "%s/absurd_%s.safetensors", scratch, cases[i].field);
    write_header_only_model(path, doc);
    LwiModel *m = (LwiModel *)0x1;
    expect(lwi.model_load(engine, path, &m), LWI_STATUS_MODEL_INCOMPATIBLE, path);
    CHECK(m == NULL && strstr(lwi.last_error(), cases[i].field) && strstr(lwi.last_error(), "absurd_"),
          "the file and the field are named: %s", lwi.last_error());
    unlink(path);
  }
  /* The model's last value made NaN. */
  FILE *f = fopen(model_path, "rb");
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char *bytes = malloc((size_t)size);
  CHECK(fread(bytes, 1, (size_t)size, f) == (size_t)size, "read the model");
  fclose(f);
  float nan = NAN;
  memcpy(bytes + size - 4, &nan, 4);
  snprintf(path, sizeof path, "%s/nan.safetensors", scratch);
  f = fopen(path, "wb");
  fwrite(bytes, 1, (size_t)size, f);
  fclose(f);
  free(bytes);
  LwiModel *m = NULL;
  expect(lwi.model_load(engine, path, &m), LWI_STATUS_MODEL_INCOMPATIBLE, "model_load(a NaN weight)");
  CHECK(strstr(lwi.last_error(), "NaN or infinite values") != NULL, "the tensor is named: %s", lwi.last_error());
  unlink(path);
  /* A 100 MB label name: refused before the checkpoint is read, the name not repeated, nothing written. */
  size_t big = 100u << 20;
  char *options = malloc(big + 256);
  int head = snprintf(options, 256, "{\"arch\": \"unetr\", \"arch_config\": {}, \"labels\": {\"1\": \"");
  memset(options + head, 'x', big);
  strcpy(options + head + big, "\"}}");
  snprintf(path, sizeof path, "%s/labels.safetensors", scratch);
  expect(lwi.model_import(volume_path, options, path), LWI_STATUS_INVALID_ARGUMENT, "model_import(100 MB label name)");
  CHECK(strstr(lwi.last_error(), "label 1") && strlen(lwi.last_error()) < 1000, "the label is named, briefly: %.200s",
        lwi.last_error());
  struct stat st;
  CHECK(stat(path, &st) != 0, "no model file is left");
  free(options);
}

static void with_model(const char *model_path, const char *scratch, const char *volume_path) {
  LwiEngine *engine = NULL;
  expect(lwi.engine_create("{\"device\": \"cpu\"}", &engine), LWI_STATUS_OK, "engine_create");
  LwiModel *model = NULL, *second = NULL;
  expect(lwi.model_load(engine, model_path, &model), LWI_STATUS_OK, "model_load(segmentation model)");
  expect(lwi.model_load(engine, model_path, &second), LWI_STATUS_OK, "model_load(second copy)");
  if (!model || !second) return;

  uint8_t labels[NX * NY * NZ];
  LwiVolume v = lent_volume();
  expect(lwi.segment(model, &v, labels, LWI_DTYPE_UINT8, sizeof labels, NULL, NULL, NULL), LWI_STATUS_OK, "segment(lent volume)");
  LwiVolume bad = lent_volume();
  bad.struct_size = 12;
  expect(lwi.segment(model, &bad, labels, LWI_DTYPE_UINT8, sizeof labels, NULL, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "segment(struct_size 12)");
  bad = lent_volume();
  bad.dims[1] = 0;
  expect(lwi.segment(model, &bad, labels, LWI_DTYPE_UINT8, sizeof labels, NULL, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "segment(zero dim)");
  bad = lent_volume();
  bad.dims[0] = bad.dims[1] = bad.dims[2] = (int64_t)1 << 40;
  expect(lwi.segment(model, &bad, labels, LWI_DTYPE_UINT8, sizeof labels, NULL, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "segment(huge dims)");
  bad = lent_volume();
  bad.dims[0] = bad.dims[1] = (int64_t)1 << 31; /* 2^62 voxels: their byte count overflows */
  bad.dims[2] = 1;
  expect(lwi.segment(model, &bad, labels, LWI_DTYPE_UINT8, sizeof labels, NULL, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "segment(dims whose bytes overflow)");
  CHECK(strstr(lwi.last_error(), "dims") != NULL, "the dims are named: %s", lwi.last_error());
  bad = lent_volume();
  bad.affine[0] = NAN;
  expect(lwi.segment(model, &bad, labels, LWI_DTYPE_UINT8, sizeof labels, NULL, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "segment(NaN spacing)");
  bad = lent_volume();
  bad.dtype = 42;
  expect(lwi.segment(model, &bad, labels, LWI_DTYPE_UINT8, sizeof labels, NULL, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "segment(dtype 42)");
  expect(lwi.segment(model, &v, labels, LWI_DTYPE_FLOAT32, sizeof labels, NULL, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "segment(float labels)");
  expect(lwi.segment(model, &v, labels, LWI_DTYPE_UINT8, sizeof labels - 1, NULL, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "segment(short buffer)");
  expect(lwi.segment(model, &v, NULL, LWI_DTYPE_UINT8, sizeof labels, NULL, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "segment(NULL labels)");
  expect(lwi.segment(model, &v, labels, LWI_DTYPE_UINT8, sizeof labels, "{\"overlap\": 2}", NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "segment(overlap 2)");
  expect(lwi.segment(model, &v, labels, LWI_DTYPE_UINT8, sizeof labels, "{\"ovrlap\": 0.5}", NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "segment(unknown option)");

  /* A segmentation model is no init-train model: fine-tuning from it is refused, naming why, before the dataset
   * is looked at (the architecture comes from the init model). */
  char config[2048];
  snprintf(config, sizeof config, "{\"dataset\": \"/nonexistent/dataset.json\", \"out\": \"%s/x.safetensors\", \"init\": \"%s\"}", scratch, model_path);
  expect(lwi.fine_tune(engine, config, NULL, NULL), LWI_STATUS_MODEL_INCOMPATIBLE, "fine_tune(init a segmentation model)");
  CHECK(strstr(lwi.last_error(), "not an init-train model") != NULL, "why is said: %s", lwi.last_error());
  snprintf(config, sizeof config, "{\"dataset\": \"/nonexistent/dataset.json\", \"out\": \"%s/x.safetensors\"}", scratch);
  expect(lwi.fine_tune(engine, config, NULL, NULL), LWI_STATUS_IO, "fine_tune(missing dataset)");
  hostile_models(engine, scratch, model_path, volume_path);
  expect(lwi.fine_tune(engine, "{\"dataset\": \"d.json\"}", NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "fine_tune(no out)");
  expect(lwi.init_train(engine, "{\"dataset\": \"d.json\", \"out\": \"o\", \"epochs\": 0}", NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "init_train(epochs 0)");
  expect(lwi.init_train(NULL, "{}", NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "init_train(NULL engine)");
  /* Training-config values out of range are bad arguments, not incompatible model files. */
  const char *bad_arch[] = {"{\"hidden_size\": 48, \"num_heads\": 5}", "{\"img_size\": [40, 40, 40]}",
                            "{\"img_size\": [0, 0, 0]}", "{\"dropout_rate\": 1.5}", "[]",
                            "{\"num_layers\": 1000000000}", "{\"mlp_dim\": 1000000000000}",
                            "{\"img_size\": [16384, 16384, 16384]}", "{\"arch\": \"unetr_pp\", \"feature_size\": 5, \"hidden_size\": 80, \"dims\": [10, 20, 40, 80], \"num_heads\": 5}"};
  for (size_t i = 0; i < sizeof bad_arch / sizeof *bad_arch; i++) {
    snprintf(config, sizeof config, "{\"dataset\": \"d.json\", \"out\": \"o\", \"arch\": %s}", bad_arch[i]);
    expect(lwi.fine_tune(engine, config, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, config);
    CHECK(strstr(lwi.last_error(), "arch") != NULL, "the field is named: %s", lwi.last_error());
  }
  expect(lwi.fine_tune(engine, "{\"dataset\": \"d.json\", \"out\": \"o\", \"window\": [250, -175]}", NULL, NULL),
         LWI_STATUS_INVALID_ARGUMENT, "fine_tune(reversed window)");
  expect(lwi.fine_tune(engine, "{\"dataset\": \"d.json\", \"out\": \"o\", \"spacing\": [0, 1, 1]}", NULL, NULL),
         LWI_STATUS_INVALID_ARGUMENT, "fine_tune(spacing 0)");
  expect(lwi.fine_tune(engine, "[\"d.json\", \"o\"]", NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "fine_tune(config as an array)");
  expect(lwi.fine_tune(engine, "{\"dataset\": \"d.json\", \"out\": \"o\", \"epochs\": 18446744073709551615}", NULL, NULL),
         LWI_STATUS_INVALID_ARGUMENT, "fine_tune(epochs 2^64 - 1: progress totals would wrap)");

  /* Two threads on one shared model, then on two models: every call succeeds, results equal the
   * single-threaded ones, and each thread keeps its own last error. */
  uint8_t alone[NX * NY * NZ];
  expect(lwi.segment(model, &v, alone, LWI_DTYPE_UINT8, sizeof alone, "{\"overlap\": 0.25}", NULL, NULL), LWI_STATUS_OK, "segment(reference)");
  for (int shared = 1; shared >= 0; shared--) {
    struct job a = {model, {0}, LWI_STATUS_INTERNAL, 0}, b = {shared ? model : second, {0}, LWI_STATUS_INTERNAL, 0};
    pthread_t ta, tb;
    pthread_create(&ta, NULL, segment_job, &a);
    pthread_create(&tb, NULL, segment_job, &b);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    CHECK(a.status == LWI_STATUS_OK && b.status == LWI_STATUS_OK, "%s model: statuses %d %d", shared ? "shared" : "separate", a.status, b.status);
    CHECK(memcmp(a.labels, alone, sizeof alone) == 0 && memcmp(b.labels, alone, sizeof alone) == 0,
          "%s model: threads give the single-threaded labels", shared ? "shared" : "separate");
    CHECK(a.own_error_kept && b.own_error_kept, "lwi_last_error is per thread");
  }
  struct job late = {second, {0}, LWI_STATUS_INTERNAL, 0};
  pthread_t tl;
  pthread_create(&tl, NULL, segment_while_freed, &late);
  while (!in_flight) {
    struct timespec ms = {0, 1000000};
    nanosleep(&ms, NULL);
  }
  lwi.model_free(second);
  freed = 1;
  pthread_join(tl, NULL);
  CHECK(late.status == LWI_STATUS_OK && memcmp(late.labels, alone, sizeof alone) == 0,
        "a model freed during a call on another thread serves that call to its end (status %d)", late.status);
  expect(lwi.segment(second, &v, labels, LWI_DTYPE_UINT8, sizeof labels, NULL, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT,
         "segment(freed model)");
  CHECK(lwi.model_info_json(second) == NULL && strstr(lwi.last_error(), "not a live handle"),
        "model_info_json(freed model) is NULL, the last error untouched: %s", lwi.last_error());

  /* lwi_forward: the raw network on a tensor file. */
  char fwd[4096];
  snprintf(fwd, sizeof fwd, "%s/forward.safetensors", scratch);
  expect(lwi.forward(NULL, volume_path, fwd, NULL), LWI_STATUS_INVALID_ARGUMENT, "forward(NULL model)");
  expect(lwi.forward(model, NULL, fwd, NULL), LWI_STATUS_INVALID_ARGUMENT, "forward(NULL in)");
  expect(lwi.forward(model, "/nonexistent/x.safetensors", fwd, NULL), LWI_STATUS_IO, "forward(missing input)");
  expect(lwi.forward(model, volume_path, fwd, NULL), LWI_STATUS_FORMAT, "forward(a volume, not a tensor file)");
  expect(lwi.forward(model, model_path, fwd, NULL), LWI_STATUS_INVALID_ARGUMENT, "forward(a file without x)");
  CHECK(strstr(lwi.last_error(), "\"x\"") != NULL, "the missing tensor is named: %s", lwi.last_error());
  expect(lwi.forward(model, model_path, fwd, "[]"), LWI_STATUS_INVALID_ARGUMENT, "forward(options as an array)");
  CHECK(access(fwd, F_OK) != 0, "a failed forward writes nothing");

  /* JSON arrays where objects belong; a manifest that cannot be written leaves no label file. */
  expect(lwi.segment(model, &v, labels, LWI_DTYPE_UINT8, sizeof labels, "[0.25, \"constant\"]", NULL, NULL),
         LWI_STATUS_INVALID_ARGUMENT, "segment(options as an array)");
  CHECK(strstr(lwi.last_error(), "must be a JSON object") != NULL, "the array is named: %s", lwi.last_error());
  char out[4096], manifest[4200];
  snprintf(out, sizeof out, "%s/leftover.nii.gz", scratch);
  snprintf(manifest, sizeof manifest, "%s.json", out);
  mkdir(manifest, 0700); /* a folder where the manifest must go */
  expect(lwi.segment_file(model, volume_path, out, NULL, NULL, NULL), LWI_STATUS_IO, "segment_file(manifest unwritable)");
  CHECK(access(out, F_OK) != 0, "a failed segment_file leaves no label file");
  rmdir(manifest);
  snprintf(config, sizeof config, "{\"save_preprocessed\": \"%s/pre.nii.gz\"}", scratch);
  expect(lwi.segment_file(model, volume_path, out, config, cancel_at_resample, NULL), LWI_STATUS_CANCELLED,
         "segment_file(cancelled)");
  snprintf(out, sizeof out, "%s/pre.nii.gz", scratch);
  CHECK(access(out, F_OK) != 0, "a cancelled segment_file leaves no preprocessed file");
  expect(lwi.segment_file(model, volume_path, out, "{\"manifest\": 3}", NULL, NULL), LWI_STATUS_INVALID_ARGUMENT,
         "segment_file(manifest 3)");
  lwi.model_free(model);
  lwi.engine_free(engine);
}

int main(int argc, char **argv) {
  if (argc != 4 && argc != 5) {
    fprintf(stderr, "usage: %s LIBLWI.so VOLUME SCRATCH_DIR [MODEL]\n", argv[0]);
    return 2;
  }
  void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    fprintf(stderr, "dlopen: %s\n", dlerror());
    return 2;
  }
  lwi.abi_version = (uint32_t(*)(void))need(lib, "lwi_abi_version");
  lwi.last_error = (const char *(*)(void))need(lib, "lwi_last_error");
  lwi.version_json = (const char *(*)(void))need(lib, "lwi_version_json");
  lwi.volume_convert = (LwiStatus(*)(const char *, const char *))need(lib, "lwi_volume_convert");
  lwi.volume_read = (LwiStatus(*)(const char *, LwiVolumeHandle **))need(lib, "lwi_volume_read");
  lwi.volume_write = (LwiStatus(*)(const LwiVolumeHandle *, const char *))need(lib, "lwi_volume_write");
  lwi.volume_write_lent = (LwiStatus(*)(const LwiVolume *, const char *))need(lib, "lwi_volume_write_lent");
  lwi.volume_dims = (LwiStatus(*)(const LwiVolumeHandle *, int64_t *))need(lib, "lwi_volume_dims");
  lwi.volume_dtype = (LwiStatus(*)(const LwiVolumeHandle *, LwiDtype *))need(lib, "lwi_volume_dtype");
  lwi.volume_affine = (LwiStatus(*)(const LwiVolumeHandle *, int32_t, double *))need(lib, "lwi_volume_affine");
  lwi.volume_copy_voxels = (LwiStatus(*)(const LwiVolumeHandle *, void *, size_t))need(lib, "lwi_volume_copy_voxels");
  lwi.volume_free = (void (*)(LwiVolumeHandle *))need(lib, "lwi_volume_free");
  lwi.volume_read_series = (LwiStatus(*)(const char *, const char *, LwiVolumeHandle **))need(lib, "lwi_volume_read_series");
  lwi.dicom_series_json = (LwiStatus(*)(const char *, char **))need(lib, "lwi_dicom_series_json");
  lwi.volume_read_dicom_files =
      (LwiStatus(*)(const char *const *, size_t, const char *, LwiVolumeHandle **))need(lib, "lwi_volume_read_dicom_files");
  lwi.phantom_dataset = (LwiStatus(*)(const char *, const char *))need(lib, "lwi_phantom_dataset");
  lwi.engine_create = (LwiStatus(*)(const char *, LwiEngine **))need(lib, "lwi_engine_create");
  lwi.engine_free = (void (*)(LwiEngine *))need(lib, "lwi_engine_free");
  lwi.model_load = (LwiStatus(*)(const LwiEngine *, const char *, LwiModel **))need(lib, "lwi_model_load");
  lwi.model_info_json = (const char *(*)(const LwiModel *))need(lib, "lwi_model_info_json");
  lwi.model_free = (void (*)(LwiModel *))need(lib, "lwi_model_free");
  lwi.model_import = (LwiStatus(*)(const char *, const char *, const char *))need(lib, "lwi_model_import");
  lwi.segment = (LwiStatus(*)(const LwiModel *, const LwiVolume *, void *, int32_t, size_t, const char *, LwiProgressFn,
                              void *))need(lib, "lwi_segment");
  lwi.segment_file =
      (LwiStatus(*)(const LwiModel *, const char *, const char *, const char *, LwiProgressFn, void *))need(lib, "lwi_segment_file");
  lwi.evaluate = (LwiStatus(*)(const char *, const char *, const char *, char **))need(lib, "lwi_evaluate");
  lwi.string_free = (void (*)(char *))need(lib, "lwi_string_free");
  lwi.init_train = (LwiStatus(*)(const LwiEngine *, const char *, LwiProgressFn, void *))need(lib, "lwi_init_train");
  lwi.fine_tune = (LwiStatus(*)(const LwiEngine *, const char *, LwiProgressFn, void *))need(lib, "lwi_fine_tune");
  lwi.forward = (LwiStatus(*)(const LwiModel *, const char *, const char *, const char *))need(lib, "lwi_forward");

  CHECK(lwi.abi_version() == LWI_ABI_VERSION, "ABI %u, header %u", lwi.abi_version(), LWI_ABI_VERSION);
  const char *json = lwi.version_json();
  CHECK(json && strstr(json, "\"libtorch_version\"") && strstr(json, "\"cuda_available\""), "version json: %s", json);
  printf("%s\n", json);

  /* NULL everywhere a pointer is required. */
  expect(lwi.volume_convert(NULL, "x.nii"), LWI_STATUS_INVALID_ARGUMENT, "convert(NULL, out)");
  expect(lwi.volume_convert(argv[2], NULL), LWI_STATUS_INVALID_ARGUMENT, "convert(in, NULL)");
  expect(lwi.volume_convert("", ""), LWI_STATUS_INVALID_ARGUMENT, "convert(\"\", \"\")");
  LwiVolumeHandle *h = (LwiVolumeHandle *)0x1;
  expect(lwi.volume_read(NULL, &h), LWI_STATUS_INVALID_ARGUMENT, "read(NULL, &h)");
  CHECK(h == NULL, "a failed read sets *out to NULL");
  expect(lwi.volume_read(argv[2], NULL), LWI_STATUS_INVALID_ARGUMENT, "read(path, NULL)");
  int64_t dims[3];
  LwiDtype dtype;
  double affine[16];
  char byte;
  expect(lwi.volume_dims(NULL, dims), LWI_STATUS_INVALID_ARGUMENT, "dims(NULL)");
  expect(lwi.volume_dtype(NULL, &dtype), LWI_STATUS_INVALID_ARGUMENT, "dtype(NULL)");
  expect(lwi.volume_affine(NULL, LWI_SPACE_RAS, affine), LWI_STATUS_INVALID_ARGUMENT, "affine(NULL)");
  expect(lwi.volume_copy_voxels(NULL, &byte, 1), LWI_STATUS_INVALID_ARGUMENT, "copy_voxels(NULL)");
  expect(lwi.volume_write(NULL, "x.nii"), LWI_STATUS_INVALID_ARGUMENT, "write(NULL)");
  expect(lwi.phantom_dataset(NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "phantom(NULL)");
  lwi.volume_free(NULL);
  passed++; /* survived free(NULL) */

  /* Files that are missing, not volumes, or of an unknown kind. */
  char path[4096];
  expect(lwi.volume_read("/nonexistent/volume.nii.gz", &h), LWI_STATUS_IO, "read(missing)");
  snprintf(path, sizeof path, "%s/garbage.nii", argv[3]);
  FILE *f = fopen(path, "wb");
  fputs("this is not a NIfTI file, but it is long enough to hold a header ...", f);
  fclose(f);
  expect(lwi.volume_read(path, &h), LWI_STATUS_FORMAT, "read(garbage)");
  CHECK(strstr(lwi.last_error(), "garbage.nii") != NULL, "the message names the file: %s", lwi.last_error());
  snprintf(path, sizeof path, "%s/volume.png", argv[3]);
  f = fopen(path, "wb");
  fputs("\x89PNG\r\n\x1a\n not a volume format lwi reads", f);
  fclose(f);
  expect(lwi.volume_read(path, &h), LWI_STATUS_UNSUPPORTED, "read(.png)");
  snprintf(path, sizeof path, "%s/out.png", argv[3]);
  expect(lwi.volume_convert(argv[2], path), LWI_STATUS_UNSUPPORTED, "convert(-> .png)");
  expect(lwi.volume_convert(argv[2], "/nonexistent/dir/out.nii.gz"), LWI_STATUS_IO, "convert(-> missing dir)");

  /* A real volume and its accessors. */
  expect(lwi.volume_read(argv[2], &h), LWI_STATUS_OK, "read(volume)");
  if (!h) return 1;
  expect(lwi.volume_dims(h, NULL), LWI_STATUS_INVALID_ARGUMENT, "dims(h, NULL)");
  expect(lwi.volume_dims(h, dims), LWI_STATUS_OK, "dims(h)");
  CHECK(dims[0] > 0 && dims[1] > 0 && dims[2] > 0, "dims %lld %lld %lld", (long long)dims[0], (long long)dims[1],
        (long long)dims[2]);
  expect(lwi.volume_dtype(h, NULL), LWI_STATUS_INVALID_ARGUMENT, "dtype(h, NULL)");
  expect(lwi.volume_dtype(h, &dtype), LWI_STATUS_OK, "dtype(h)");
  expect(lwi.volume_affine(h, LWI_SPACE_RAS, NULL), LWI_STATUS_INVALID_ARGUMENT, "affine(h, NULL)");
  expect(lwi.volume_affine(h, 7, affine), LWI_STATUS_INVALID_ARGUMENT, "affine(h, space 7)");
  expect(lwi.volume_affine(h, -1, affine), LWI_STATUS_INVALID_ARGUMENT, "affine(h, space -1)");
  double lps[16];
  expect(lwi.volume_affine(h, LWI_SPACE_RAS, affine), LWI_STATUS_OK, "affine(h, RAS)");
  expect(lwi.volume_affine(h, LWI_SPACE_LPS, lps), LWI_STATUS_OK, "affine(h, LPS)");
  for (int c = 0; c < 4; c++) {
    CHECK(lps[c] == -affine[c] && lps[4 + c] == -affine[4 + c] && lps[8 + c] == affine[8 + c],
          "LPS differs from RAS by the sign of x and y, column %d", c);
  }
  size_t itemsize[] = {1, 1, 2, 2, 4, 4, 8, 8, 4, 8};
  size_t n = (size_t)(dims[0] * dims[1] * dims[2]) * itemsize[dtype];
  char *buf = malloc(n + 1);
  expect(lwi.volume_copy_voxels(h, buf, n + 1), LWI_STATUS_INVALID_ARGUMENT, "copy_voxels(too big)");
  expect(lwi.volume_copy_voxels(h, buf, n - 1), LWI_STATUS_INVALID_ARGUMENT, "copy_voxels(too small)");
  expect(lwi.volume_copy_voxels(h, NULL, n), LWI_STATUS_INVALID_ARGUMENT, "copy_voxels(NULL dst)");
  expect(lwi.volume_copy_voxels(h, buf, n), LWI_STATUS_OK, "copy_voxels");
  expect(lwi.volume_write(h, NULL), LWI_STATUS_INVALID_ARGUMENT, "write(h, NULL)");
  snprintf(path, sizeof path, "%s/copy.nrrd", argv[3]);
  expect(lwi.volume_write(h, path), LWI_STATUS_OK, "write(h, .nrrd)");
  LwiVolumeHandle *h2 = NULL;
  expect(lwi.volume_read(path, &h2), LWI_STATUS_OK, "read(written .nrrd)");
  char *buf2 = malloc(n);
  expect(lwi.volume_copy_voxels(h2, buf2, n), LWI_STATUS_OK, "copy_voxels(written)");
  CHECK(memcmp(buf, buf2, n) == 0, "voxels survive a .nrrd round trip");
  double affine2[16];
  expect(lwi.volume_affine(h2, LWI_SPACE_RAS, affine2), LWI_STATUS_OK, "affine(written)");
  for (int i = 0; i < 16; i++) CHECK(affine[i] == affine2[i], "affine[%d] %.17g != %.17g", i, affine[i], affine2[i]);
  lwi.volume_free(h2);

  /* The same voxels lent by the host, with the matrix in LPS, written without a handle. */
  double lps_affine[16];
  expect(lwi.volume_affine(h, LWI_SPACE_LPS, lps_affine), LWI_STATUS_OK, "affine(LPS) for a lent copy");
  LwiVolume lent = {sizeof(LwiVolume), (int32_t)dtype, {dims[0], dims[1], dims[2]}, buf, {0}, LWI_SPACE_LPS};
  memcpy(lent.affine, lps_affine, sizeof lps_affine);
  snprintf(path, sizeof path, "%s/lent.nii.gz", argv[3]);
  expect(lwi.volume_write_lent(NULL, path), LWI_STATUS_INVALID_ARGUMENT, "write_lent(NULL)");
  expect(lwi.volume_write_lent(&lent, NULL), LWI_STATUS_INVALID_ARGUMENT, "write_lent(v, NULL)");
  lent.struct_size = 8;
  expect(lwi.volume_write_lent(&lent, path), LWI_STATUS_INVALID_ARGUMENT, "write_lent(wrong struct_size)");
  CHECK(access(path, F_OK) != 0, "a refused write_lent leaves no file");
  lent.struct_size = sizeof(LwiVolume);
  expect(lwi.volume_write_lent(&lent, path), LWI_STATUS_OK, "write_lent(.nii.gz)");
  h2 = NULL;
  expect(lwi.volume_read(path, &h2), LWI_STATUS_OK, "read(written lent .nii.gz)");
  expect(lwi.volume_copy_voxels(h2, buf2, n), LWI_STATUS_OK, "copy_voxels(written lent)");
  CHECK(memcmp(buf, buf2, n) == 0, "lent voxels survive a .nii.gz round trip");
  expect(lwi.volume_affine(h2, LWI_SPACE_RAS, affine2), LWI_STATUS_OK, "affine(written lent)");
  for (int i = 0; i < 16; i++)
    CHECK(fabs(affine[i] - affine2[i]) < 1e-5, "lent affine[%d] %.17g != %.17g", i, affine[i], affine2[i]);
  free(buf);
  free(buf2);
  lwi.volume_free(h2);

  /* Handles used after their free, freed twice, of the wrong kind, or never made by lwi. */
  LwiEngine *volume_as_engine = (LwiEngine *)h;
  LwiModel *wrong_kind = NULL;
  expect(lwi.model_load(volume_as_engine, argv[2], &wrong_kind), LWI_STATUS_INVALID_ARGUMENT, "model_load(a volume as engine)");
  CHECK(strstr(lwi.last_error(), "another kind") != NULL, "wrong kind is named: %s", lwi.last_error());
  lwi.volume_free(h);
  expect(lwi.volume_dims(h, dims), LWI_STATUS_INVALID_ARGUMENT, "volume_dims(freed handle)");
  CHECK(strstr(lwi.last_error(), "not a live handle") != NULL, "use after free is named: %s", lwi.last_error());
  expect(lwi.volume_write(h, path), LWI_STATUS_INVALID_ARGUMENT, "volume_write(freed handle)");
  lwi.volume_free(h);
  CHECK(strstr(lwi.last_error(), "not a live handle") != NULL,
        "a double free is a no-op that leaves the last error alone: %s", lwi.last_error());
  int64_t not_a_handle[8] = {0};
  expect(lwi.volume_dims((LwiVolumeHandle *)not_a_handle, dims), LWI_STATUS_INVALID_ARGUMENT, "volume_dims(stack memory)");

  /* DICOM entry points: NULLs, a series UID on a NIfTI file, a folder without DICOM images. */
  LwiVolumeHandle *series = (LwiVolumeHandle *)0x1;
  expect(lwi.volume_read_series(NULL, NULL, &series), LWI_STATUS_INVALID_ARGUMENT, "volume_read_series(NULL path)");
  CHECK(series == NULL, "a failed series read sets *out to NULL");
  expect(lwi.volume_read_series(argv[2], "1.2.3", NULL), LWI_STATUS_INVALID_ARGUMENT, "volume_read_series(NULL out)");
  expect(lwi.volume_read_series(argv[2], "1.2.3", &series), LWI_STATUS_INVALID_ARGUMENT, "volume_read_series(UID on NIfTI)");
  expect(lwi.volume_read_series(argv[3], NULL, &series), LWI_STATUS_FORMAT, "volume_read_series(folder without DICOM)");
  const char *files[2] = {argv[2], NULL};
  expect(lwi.volume_read_dicom_files(NULL, 1, NULL, &series), LWI_STATUS_INVALID_ARGUMENT, "read_dicom_files(NULL paths)");
  expect(lwi.volume_read_dicom_files(files, 0, NULL, &series), LWI_STATUS_INVALID_ARGUMENT, "read_dicom_files(count 0)");
  expect(lwi.volume_read_dicom_files(files, 2, NULL, &series), LWI_STATUS_INVALID_ARGUMENT, "read_dicom_files(NULL entry)");
  CHECK(strstr(lwi.last_error(), "paths[1]") != NULL, "the NULL entry is named: %s", lwi.last_error());
  expect(lwi.volume_read_dicom_files(files, 1, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "read_dicom_files(NULL out)");
  expect(lwi.volume_read_dicom_files(files, 1, NULL, &series), LWI_STATUS_FORMAT, "read_dicom_files(a NIfTI file)");
  char *listing = (char *)0x1;
  expect(lwi.dicom_series_json(NULL, &listing), LWI_STATUS_INVALID_ARGUMENT, "dicom_series_json(NULL path)");
  CHECK(listing == NULL, "a failed listing sets *out_json to NULL");
  expect(lwi.dicom_series_json(argv[3], NULL), LWI_STATUS_INVALID_ARGUMENT, "dicom_series_json(NULL out)");
  expect(lwi.dicom_series_json("/nonexistent/dicom", &listing), LWI_STATUS_IO, "dicom_series_json(missing folder)");
  expect(lwi.dicom_series_json(argv[3], &listing), LWI_STATUS_OK, "dicom_series_json(folder of NIfTI)");
  CHECK(listing && strstr(listing, "\"series\":[]") && strstr(listing, "\"skipped\""), "listing: %s", listing ? listing : "(null)");
  lwi.string_free(listing);

  /* Options JSON that is malformed, of the wrong shape, or names unknown keys. */
  snprintf(path, sizeof path, "%s/phantom", argv[3]);
  expect(lwi.phantom_dataset(path, "{not json"), LWI_STATUS_INVALID_ARGUMENT, "phantom(malformed json)");
  expect(lwi.phantom_dataset(path, "{\"cases\": 1, \"sede\": 3}"), LWI_STATUS_INVALID_ARGUMENT, "phantom(unknown key)");
  CHECK(strstr(lwi.last_error(), "sede") != NULL, "the message names the unknown key: %s", lwi.last_error());
  expect(lwi.phantom_dataset(path, "{\"cases\": -1}"), LWI_STATUS_INVALID_ARGUMENT, "phantom(cases -1)");
  expect(lwi.phantom_dataset(path, "[1, 0]"), LWI_STATUS_INVALID_ARGUMENT, "phantom(options as an array)");
  expect(lwi.evaluate(argv[2], argv[2], "[[1]]", &listing), LWI_STATUS_INVALID_ARGUMENT, "evaluate(options as an array)");
  expect(lwi.model_import(argv[2], "{\"arch\": \"unetr\", \"arch_config\": [1, 2], \"labels\": {}}", "m.safetensors"),
         LWI_STATUS_INVALID_ARGUMENT, "model_import(arch_config as an array)");
  CHECK(strstr(lwi.last_error(), "arch_config") != NULL, "the field is named: %s", lwi.last_error());
  expect(lwi.phantom_dataset(path, "{\"cases\": 1, \"size\": [4, 4]}"), LWI_STATUS_INVALID_ARGUMENT, "phantom(size 2-D)");
  expect(lwi.phantom_dataset(path, "{\"cases\": 1, \"size\": [0, 16, 16]}"), LWI_STATUS_INVALID_ARGUMENT,
         "phantom(size 0)");
  expect(lwi.phantom_dataset(path, "{\"cases\": 1, \"spacing\": [1, -1, 1]}"), LWI_STATUS_INVALID_ARGUMENT,
         "phantom(negative spacing)");
  expect(lwi.phantom_dataset(path, "{\"cases\": 1, \"size\": [16, 16, 12]}"), LWI_STATUS_OK, "phantom(small)");

  /* Engines and models. */
  LwiEngine *engine = (LwiEngine *)0x1;
  expect(lwi.engine_create(NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "engine_create(NULL, NULL)");
  expect(lwi.engine_create("{\"device\": \"tpu\"}", &engine), LWI_STATUS_INVALID_ARGUMENT, "engine_create(tpu)");
  CHECK(engine == NULL, "a failed create sets *out to NULL");
  expect(lwi.engine_create("{\"device\": \"cuda:99\"}", &engine), LWI_STATUS_DEVICE_UNAVAILABLE, "engine_create(cuda:99)");
  expect(lwi.engine_create("{\"threads\": -2}", &engine), LWI_STATUS_INVALID_ARGUMENT, "engine_create(threads -2)");
  expect(lwi.engine_create("[1, 2]", &engine), LWI_STATUS_INVALID_ARGUMENT, "engine_create(json array)");
  expect(lwi.engine_create("{\"device\": \"cpu\"}", &engine), LWI_STATUS_OK, "engine_create(cpu)");
  LwiModel *model = (LwiModel *)0x1;
  expect(lwi.model_load(NULL, argv[2], &model), LWI_STATUS_INVALID_ARGUMENT, "model_load(NULL engine)");
  CHECK(model == NULL, "a failed load sets *out to NULL");
  expect(lwi.model_load(engine, NULL, &model), LWI_STATUS_INVALID_ARGUMENT, "model_load(NULL path)");
  expect(lwi.model_load(engine, argv[2], NULL), LWI_STATUS_INVALID_ARGUMENT, "model_load(NULL out)");
  expect(lwi.model_load(engine, argv[2], &model), LWI_STATUS_FORMAT, "model_load(a volume, not a model)");
  expect(lwi.model_load(engine, "/nonexistent/m.safetensors", &model), LWI_STATUS_IO, "model_load(missing)");
  CHECK(lwi.model_info_json(NULL) == NULL && strstr(lwi.last_error(), "m.safetensors") != NULL,
        "model_info_json(NULL) is NULL and leaves the last error alone: %s", lwi.last_error());
  lwi.model_free(NULL);
  lwi.engine_free(NULL);
  passed++; /* survived the NULL frees */
  expect(lwi.model_import(NULL, "{}", "m.safetensors"), LWI_STATUS_INVALID_ARGUMENT, "model_import(NULL)");
  expect(lwi.model_import(argv[2], "{not json", "m.safetensors"), LWI_STATUS_INVALID_ARGUMENT, "model_import(bad json)");
  expect(lwi.model_import(argv[2],
                          "{\"arch\": \"unetr\", \"arch_config\": {}, \"labels\": {}}", "/nonexistent/m.safetensors"),
         LWI_STATUS_FORMAT, "model_import(a volume, not a checkpoint)");
  expect(lwi.model_import(argv[2], "{\"arch\": \"swin\", \"arch_config\": {}, \"labels\": {}}", "m.safetensors"),
         LWI_STATUS_UNSUPPORTED, "model_import(arch swin)");
  lwi.engine_free(engine);
  expect(lwi.model_load(engine, argv[2], &model), LWI_STATUS_INVALID_ARGUMENT, "model_load(freed engine)");
  lwi.engine_free(engine);
  CHECK(strstr(lwi.last_error(), "not a live handle") != NULL, "engine double free leaves the last error: %s",
        lwi.last_error());

  robustness(argv[2], argv[3]);

  /* Segmentation and evaluation arguments (a model is needed for the rest: the Python suite). */
  uint8_t labels[8];
  float voxels[8] = {0};
  LwiVolume vol = {sizeof(LwiVolume), LWI_DTYPE_FLOAT32, {2, 2, 2}, voxels, {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1},
                   LWI_SPACE_RAS};
  expect(lwi.segment(NULL, &vol, labels, LWI_DTYPE_UINT8, 8, NULL, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "segment(NULL model)");
  expect(lwi.segment_file(NULL, argv[2], "x.nii.gz", NULL, NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "segment_file(NULL model)");
  char *report = (char *)0x1;
  expect(lwi.evaluate(NULL, argv[2], NULL, &report), LWI_STATUS_INVALID_ARGUMENT, "evaluate(NULL pred)");
  CHECK(report == NULL, "a failed evaluate sets *out_json to NULL");
  expect(lwi.evaluate(argv[2], argv[2], NULL, NULL), LWI_STATUS_INVALID_ARGUMENT, "evaluate(NULL out)");
  expect(lwi.evaluate(argv[2], argv[2], "{\"labels\": \"all\"}", &report), LWI_STATUS_INVALID_ARGUMENT, "evaluate(bad labels)");
  expect(lwi.evaluate(argv[2], argv[2], "{\"labels\": [1]}", &report), LWI_STATUS_OK, "evaluate(volume vs itself)");
  CHECK(report && strstr(report, "\"dice\""), "evaluate report: %s", report ? report : "(null)");
  lwi.string_free(report);
  lwi.string_free(NULL);

  if (argc == 5) with_model(argv[4], argv[3], argv[2]);

  printf("abi_misuse: %d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
