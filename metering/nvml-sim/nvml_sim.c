/*
 * nvml-sim: a libnvidia-ml.so.1 that simulates a node's NVIDIA GPUs.
 *
 * The real nvidia-ml-py (pynvml) loads this library through LD_LIBRARY_PATH exactly as it
 * loads the driver's, so the metering agent runs unchanged on machines without a GPU. The
 * GPUs and what happens to them are described by a scenario file (YAML or JSON, parsed with
 * libyaml) named by GPUDELIVERY_NVML_SCENARIO: the GPUs' identities, and a timeline of
 * actions at offsets in seconds from the scenario's start (utilization and power changes,
 * processes starting and leaving, XID events, ECC and row-remap counts, a GPU falling off
 * the bus, injected NVML errors). Without a scenario file the node has 8 idle, healthy
 * H100 80GB HBM3 GPUs.
 *
 * Time is wall-clock: the scenario starts when the library is loaded, at
 * GPUDELIVERY_NVML_EPOCH (Unix seconds, may be fractional) when that is set, so that
 * several processes share one timeline, and runs `speed` times faster than real time.
 * Energy is the exact integral of the piecewise-constant power (monotonic, millijoules).
 *
 * Implemented: the calls the metering agent makes, with the call protocols pynvml relies on
 * (nvmlInitWithFlags, the _v2/_v3 variants, the size query of
 * nvmlDeviceGetComputeRunningProcesses_v3, XID delivery through event sets with TIMEOUT).
 * Every other symbol pynvml knows (symbols.txt) exists as a weak stub returning
 * NVML_ERROR_NOT_SUPPORTED. Not a goal: MIG, vGPU, clocks, NVLink, accounting.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <yaml.h>

typedef int nvmlReturn_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_TIMEOUT 10
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_UNKNOWN 999

#define NVML_TEMPERATURE_GPU 0
#define NVML_MEMORY_ERROR_TYPE_CORRECTED 0
#define NVML_MEMORY_ERROR_TYPE_UNCORRECTED 1
#define EVENT_TYPE_XID_CRITICAL_ERROR 0x8ULL

#define MAX_GPUS 16
#define MAX_PROCESSES 64
#define MAX_ERRORS 16
#define MAX_EVENT_SETS 64
#define TEXT 96
#define MIB (1024ULL * 1024ULL)
/* What a GPU reports as used with no process on it (driver reservations). */
#define BASE_MEMORY_USED_MIB 512ULL

/* ---- the simulated state ------------------------------------------------------------ */

typedef struct {
    unsigned int pid;
    unsigned long long used_bytes;
} sim_process_t;

typedef struct {
    char function[TEXT]; /* an NVML function name, or "*" for every device call */
    nvmlReturn_t code;
    double until_s; /* scenario seconds; INFINITY: until the end */
} sim_error_t;

typedef struct {
    char uuid[TEXT], name[TEXT], serial[TEXT], pci_bus_id[TEXT];
    unsigned int index, pci_device_id;
    unsigned long long memory_total_bytes;
    unsigned int power_limit_mw;
    /* values that the timeline changes */
    unsigned int util_gpu, util_memory, power_mw, temperature_c;
    double energy_mj;
    int lost;
    unsigned long long ecc_corrected, ecc_uncorrected;
    unsigned int remapped_correctable, remapped_uncorrectable, remap_pending, remap_failed;
    sim_process_t processes[MAX_PROCESSES];
    int process_count;
    sim_error_t errors[MAX_ERRORS];
    int error_count;
} sim_gpu_t;

enum action_field {
    SET_UTIL_GPU = 1 << 0,
    SET_UTIL_MEMORY = 1 << 1,
    SET_POWER = 1 << 2,
    SET_TEMPERATURE = 1 << 3,
    DO_XID = 1 << 4,
    DO_LOST = 1 << 5,
    DO_RESET = 1 << 6,
    ADD_PROCESS = 1 << 7,
    END_PROCESS = 1 << 8,
    ADD_ECC = 1 << 9,
    ADD_REMAP = 1 << 10,
    SET_REMAP_FLAGS = 1 << 11,
    DO_ENERGY_RESET = 1 << 12,
    ADD_ERROR = 1 << 13,
    CLEAR_ERRORS = 1 << 14,
};

typedef struct {
    double at_s;
    int gpu; /* index, or -1 for every GPU */
    unsigned int fields;
    unsigned int util_gpu, util_memory, power_mw, temperature_c, xid;
    sim_process_t process;
    unsigned long long ecc_corrected, ecc_uncorrected;
    unsigned int remap_correctable, remap_uncorrectable, remap_pending, remap_failed;
    sim_error_t error;
} sim_action_t;

typedef struct {
    int used;
    size_t cursor;                      /* next action to consider for delivery */
    unsigned long long types[MAX_GPUS]; /* registered event types per GPU */
} sim_event_set_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int init_count;
static int loaded;
static char driver_version[TEXT] = "550.54.15";
static sim_gpu_t gpus[MAX_GPUS];
static unsigned int gpu_count;
static sim_action_t *actions;
static size_t action_count;
static size_t applied;      /* actions [0, applied) are in the state */
static double state_time_s; /* scenario time the state (and energy) is at */
static double epoch_s;      /* real time of scenario second 0 */
static double speed = 1.0;
static sim_event_set_t event_sets[MAX_EVENT_SETS];

static double real_now_s(void) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

static double scenario_now_s(void) { return (real_now_s() - epoch_s) * speed; }

__attribute__((constructor)) static void remember_load_time(void) {
    const char *epoch = getenv("GPUDELIVERY_NVML_EPOCH");
    epoch_s = (epoch && *epoch) ? strtod(epoch, NULL) : real_now_s();
}

static void integrate_energy(double until_s) {
    if (until_s <= state_time_s) return;
    double elapsed = until_s - state_time_s;
    for (unsigned int i = 0; i < gpu_count; i++)
        if (!gpus[i].lost) gpus[i].energy_mj += gpus[i].power_mw * elapsed; /* mW x s = mJ */
    state_time_s = until_s;
}

static void apply_to(sim_gpu_t *gpu, const sim_action_t *a) {
    if (a->fields & SET_UTIL_GPU) gpu->util_gpu = a->util_gpu;
    if (a->fields & SET_UTIL_MEMORY) gpu->util_memory = a->util_memory;
    if (a->fields & SET_POWER) gpu->power_mw = a->power_mw;
    if (a->fields & SET_TEMPERATURE) gpu->temperature_c = a->temperature_c;
    if (a->fields & DO_LOST) gpu->lost = 1;
    if (a->fields & DO_RESET) { /* as a real reset: found again, counters and processes cleared */
        gpu->lost = 0;
        gpu->energy_mj = 0;
        gpu->process_count = 0;
        gpu->remap_pending = 0;
    }
    if (a->fields & DO_ENERGY_RESET) gpu->energy_mj = 0;
    if ((a->fields & ADD_PROCESS) && gpu->process_count < MAX_PROCESSES)
        gpu->processes[gpu->process_count++] = a->process;
    if (a->fields & END_PROCESS)
        for (int p = 0; p < gpu->process_count; p++)
            if (gpu->processes[p].pid == a->process.pid) {
                gpu->processes[p] = gpu->processes[--gpu->process_count];
                break;
            }
    if (a->fields & ADD_ECC) {
        gpu->ecc_corrected += a->ecc_corrected;
        gpu->ecc_uncorrected += a->ecc_uncorrected;
    }
    if (a->fields & ADD_REMAP) {
        gpu->remapped_correctable += a->remap_correctable;
        gpu->remapped_uncorrectable += a->remap_uncorrectable;
    }
    if (a->fields & SET_REMAP_FLAGS) {
        gpu->remap_pending = a->remap_pending;
        gpu->remap_failed = a->remap_failed;
    }
    if (a->fields & CLEAR_ERRORS) gpu->error_count = 0;
    if ((a->fields & ADD_ERROR) && gpu->error_count < MAX_ERRORS)
        gpu->errors[gpu->error_count++] = a->error;
}

/* Bring the state to scenario time `now_s`: apply due actions, integrating power between. */
static void advance(double now_s) {
    while (applied < action_count && actions[applied].at_s <= now_s) {
        const sim_action_t *a = &actions[applied++];
        integrate_energy(a->at_s);
        if (a->gpu < 0) {
            for (unsigned int i = 0; i < gpu_count; i++) apply_to(&gpus[i], a);
        } else {
            apply_to(&gpus[a->gpu], a);
        }
    }
    integrate_energy(now_s);
}

/* ---- the scenario file ---------------------------------------------------------------- */

typedef struct {
    yaml_document_t *doc;
    const char *path;
    char message[512];
} loader_t;

static int fail(loader_t *ld, const char *format, ...) {
    va_list args;
    va_start(args, format);
    int n = snprintf(ld->message, sizeof ld->message, "%s: ", ld->path);
    vsnprintf(ld->message + n, sizeof ld->message - (size_t)n, format, args);
    va_end(args);
    return -1;
}

static const char *scalar(loader_t *ld, yaml_node_t *node) {
    (void)ld;
    return node && node->type == YAML_SCALAR_NODE ? (const char *)node->data.scalar.value : NULL;
}

static int number(loader_t *ld, yaml_node_t *node, const char *what, double low, double high,
                  double *out) {
    const char *text = scalar(ld, node);
    char *end = NULL;
    errno = 0;
    double value = text ? strtod(text, &end) : 0;
    if (!text || end == text || *end || errno || isnan(value))
        return fail(ld, "%s must be a number", what);
    if (value < low || value > high) return fail(ld, "%s must lie in %g..%g", what, low, high);
    *out = value;
    return 0;
}

static int boolean(loader_t *ld, yaml_node_t *node, const char *what, int *out) {
    const char *text = scalar(ld, node);
    if (text && (!strcmp(text, "true") || !strcmp(text, "yes"))) *out = 1;
    else if (text && (!strcmp(text, "false") || !strcmp(text, "no"))) *out = 0;
    else return fail(ld, "%s must be true or false", what);
    return 0;
}

static int text_field(loader_t *ld, yaml_node_t *node, const char *what, char *out) {
    const char *text = scalar(ld, node);
    if (!text || !*text || strlen(text) >= TEXT) return fail(ld, "%s must be a short string", what);
    strcpy(out, text);
    return 0;
}

/* Iterate a mapping's pairs as (const char *KEY, yaml_node_t *VALUE); keys are scalars. */
#define FOR_EACH_PAIR(ld, node, KEY, VALUE)                                                    \
    for (yaml_node_pair_t *pair_ = (node)->data.mapping.pairs.start;                           \
         pair_ < (node)->data.mapping.pairs.top; pair_++)                                      \
        for (const char *KEY = scalar(ld, yaml_document_get_node((ld)->doc, pair_->key)); KEY; \
             KEY = NULL)                                                                       \
            for (yaml_node_t *VALUE = yaml_document_get_node((ld)->doc, pair_->value); VALUE;  \
                 VALUE = NULL)

static void default_gpu(unsigned int index) {
    sim_gpu_t *gpu = &gpus[index];
    memset(gpu, 0, sizeof *gpu);
    gpu->index = index;
    snprintf(gpu->uuid, TEXT, "GPU-00000000-0000-4000-8000-%012x", index);
    strcpy(gpu->name, "NVIDIA H100 80GB HBM3");
    snprintf(gpu->serial, TEXT, "165282300%04u", index);
    /* The bus numbers of an 8-GPU HGX H100 board. */
    static const unsigned int buses[] = {0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb};
    snprintf(gpu->pci_bus_id, TEXT, "00000000:%02X:00.0", buses[index % 8] + index / 8);
    gpu->pci_device_id = 0x233010DE;
    gpu->memory_total_bytes = 81559ULL * MIB;
    gpu->power_limit_mw = 700000;
    gpu->power_mw = 70000;
    gpu->temperature_c = 33;
}

static int load_gpu(loader_t *ld, yaml_node_t *node, unsigned int index) {
    char what[64];
    default_gpu(index);
    sim_gpu_t *gpu = &gpus[index];
    if (node->type != YAML_MAPPING_NODE) return fail(ld, "gpus[%u] must be a mapping", index);
    FOR_EACH_PAIR(ld, node, key, value) {
        double v;
        snprintf(what, sizeof what, "gpus[%u].%s", index, key);
        if (!strcmp(key, "uuid")) { if (text_field(ld, value, what, gpu->uuid)) return -1; }
        else if (!strcmp(key, "name")) { if (text_field(ld, value, what, gpu->name)) return -1; }
        else if (!strcmp(key, "serial")) { if (text_field(ld, value, what, gpu->serial)) return -1; }
        else if (!strcmp(key, "pci_bus_id")) { if (text_field(ld, value, what, gpu->pci_bus_id)) return -1; }
        else if (!strcmp(key, "memory_total_mib")) {
            if (number(ld, value, what, 1, 1e7, &v)) return -1;
            gpu->memory_total_bytes = (unsigned long long)v * MIB;
        } else if (!strcmp(key, "power_limit_w")) {
            if (number(ld, value, what, 1, 1e5, &v)) return -1;
            gpu->power_limit_mw = (unsigned int)(v * 1000);
        } else if (!strcmp(key, "power_w")) {
            if (number(ld, value, what, 0, 1e5, &v)) return -1;
            gpu->power_mw = (unsigned int)(v * 1000);
        } else if (!strcmp(key, "temperature_c")) {
            if (number(ld, value, what, 0, 200, &v)) return -1;
            gpu->temperature_c = (unsigned int)v;
        } else return fail(ld, "%s: unknown field", what);
    }
    return 0;
}

static int load_action(loader_t *ld, yaml_node_t *node, size_t index, sim_action_t *a) {
    char what[96];
    memset(a, 0, sizeof *a);
    a->gpu = -2;
    a->error.until_s = INFINITY;
    if (node->type != YAML_MAPPING_NODE) return fail(ld, "timeline[%zu] must be a mapping", index);
    int have_at = 0;
    FOR_EACH_PAIR(ld, node, key, value) {
        double v;
        int flag;
        snprintf(what, sizeof what, "timeline[%zu].%s", index, key);
        if (!strcmp(key, "at")) {
            if (number(ld, value, what, 0, 1e10, &a->at_s)) return -1;
            have_at = 1;
        } else if (!strcmp(key, "gpu")) {
            const char *text = scalar(ld, value);
            if (text && !strcmp(text, "all")) { a->gpu = -1; continue; }
            if (number(ld, value, what, 0, gpu_count - 1, &v)) return -1;
            a->gpu = (int)v;
        } else if (!strcmp(key, "utilization_gpu")) {
            if (number(ld, value, what, 0, 100, &v)) return -1;
            a->util_gpu = (unsigned int)v, a->fields |= SET_UTIL_GPU;
        } else if (!strcmp(key, "utilization_memory")) {
            if (number(ld, value, what, 0, 100, &v)) return -1;
            a->util_memory = (unsigned int)v, a->fields |= SET_UTIL_MEMORY;
        } else if (!strcmp(key, "power_w")) {
            if (number(ld, value, what, 0, 1e5, &v)) return -1;
            a->power_mw = (unsigned int)(v * 1000), a->fields |= SET_POWER;
        } else if (!strcmp(key, "temperature_c")) {
            if (number(ld, value, what, 0, 200, &v)) return -1;
            a->temperature_c = (unsigned int)v, a->fields |= SET_TEMPERATURE;
        } else if (!strcmp(key, "xid")) {
            if (number(ld, value, what, 1, 1e6, &v)) return -1;
            a->xid = (unsigned int)v, a->fields |= DO_XID;
        } else if (!strcmp(key, "lost")) {
            if (boolean(ld, value, what, &flag)) return -1;
            if (flag) a->fields |= DO_LOST;
        } else if (!strcmp(key, "reset")) {
            if (boolean(ld, value, what, &flag)) return -1;
            if (flag) a->fields |= DO_RESET;
        } else if (!strcmp(key, "energy_reset")) {
            if (boolean(ld, value, what, &flag)) return -1;
            if (flag) a->fields |= DO_ENERGY_RESET;
        } else if (!strcmp(key, "process_start") || !strcmp(key, "process_end")) {
            int start = !strcmp(key, "process_start");
            if (value->type != YAML_MAPPING_NODE) return fail(ld, "%s must be a mapping", what);
            FOR_EACH_PAIR(ld, value, pkey, pvalue) {
                char inner[128];
                snprintf(inner, sizeof inner, "%s.%s", what, pkey);
                if (!strcmp(pkey, "pid")) {
                    if (number(ld, pvalue, inner, 1, 4194304, &v)) return -1;
                    a->process.pid = (unsigned int)v;
                } else if (start && !strcmp(pkey, "used_memory_mib")) {
                    if (number(ld, pvalue, inner, 0, 1e7, &v)) return -1;
                    a->process.used_bytes = (unsigned long long)v * MIB;
                } else return fail(ld, "%s: unknown field", inner);
            }
            if (!a->process.pid) return fail(ld, "%s.pid is missing", what);
            a->fields |= start ? ADD_PROCESS : END_PROCESS;
        } else if (!strcmp(key, "ecc_corrected") || !strcmp(key, "ecc_uncorrected")) {
            if (number(ld, value, what, 0, 1e12, &v)) return -1;
            if (key[4] == 'c') a->ecc_corrected = (unsigned long long)v;
            else a->ecc_uncorrected = (unsigned long long)v;
            a->fields |= ADD_ECC;
        } else if (!strcmp(key, "remapped_correctable") || !strcmp(key, "remapped_uncorrectable")) {
            if (number(ld, value, what, 0, 1e6, &v)) return -1;
            if (key[9] == 'c') a->remap_correctable = (unsigned int)v;
            else a->remap_uncorrectable = (unsigned int)v;
            a->fields |= ADD_REMAP;
        } else if (!strcmp(key, "remap_pending") || !strcmp(key, "remap_failed")) {
            if (boolean(ld, value, what, &flag)) return -1;
            if (key[6] == 'p') a->remap_pending = (unsigned int)flag;
            else a->remap_failed = (unsigned int)flag;
            a->fields |= SET_REMAP_FLAGS;
        } else if (!strcmp(key, "nvml_error")) {
            if (value->type != YAML_MAPPING_NODE) return fail(ld, "%s must be a mapping", what);
            strcpy(a->error.function, "*");
            a->error.code = NVML_ERROR_UNKNOWN;
            double for_s = INFINITY;
            FOR_EACH_PAIR(ld, value, ekey, evalue) {
                char inner[128];
                snprintf(inner, sizeof inner, "%s.%s", what, ekey);
                if (!strcmp(ekey, "function")) {
                    if (text_field(ld, evalue, inner, a->error.function)) return -1;
                } else if (!strcmp(ekey, "code")) {
                    if (number(ld, evalue, inner, 1, 1e6, &v)) return -1;
                    a->error.code = (nvmlReturn_t)v;
                } else if (!strcmp(ekey, "for_s")) {
                    if (number(ld, evalue, inner, 0, 1e10, &for_s)) return -1;
                } else return fail(ld, "%s: unknown field", inner);
            }
            a->fields |= ADD_ERROR;
            a->error.until_s = for_s; /* made absolute once `at` is known */
        } else if (!strcmp(key, "clear_nvml_errors")) {
            if (boolean(ld, value, what, &flag)) return -1;
            if (flag) a->fields |= CLEAR_ERRORS;
        } else return fail(ld, "%s: unknown field", what);
    }
    if (!have_at) return fail(ld, "timeline[%zu].at is missing", index);
    if (a->gpu == -2) return fail(ld, "timeline[%zu].gpu is missing (an index or \"all\")", index);
    if (!a->fields) return fail(ld, "timeline[%zu] does nothing", index);
    if ((a->fields & DO_XID) && a->gpu < 0)
        return fail(ld, "timeline[%zu].xid needs one gpu, not \"all\"", index);
    if (a->fields & ADD_ERROR) a->error.until_s += a->at_s;
    return 0;
}

static int by_time(const void *left, const void *right) {
    const sim_action_t *a = left, *b = right;
    return (a->at_s > b->at_s) - (a->at_s < b->at_s);
}

static int load_scenario(loader_t *ld) {
    yaml_node_t *root = yaml_document_get_root_node(ld->doc);
    if (!root || root->type != YAML_MAPPING_NODE) return fail(ld, "must be a mapping");
    yaml_node_t *gpu_list = NULL, *timeline = NULL;
    FOR_EACH_PAIR(ld, root, key, value) {
        double v;
        if (!strcmp(key, "gpus")) gpu_list = value;
        else if (!strcmp(key, "timeline")) timeline = value;
        else if (!strcmp(key, "description")) {
            if (!scalar(ld, value)) return fail(ld, "description must be a string");
        } else if (!strcmp(key, "driver_version")) {
            if (text_field(ld, value, "driver_version", driver_version)) return -1;
        } else if (!strcmp(key, "speed")) {
            if (number(ld, value, "speed", 0.001, 1e6, &v)) return -1;
            speed = v;
        } else return fail(ld, "%s: unknown field", key);
    }
    if (gpu_list) {
        if (gpu_list->type != YAML_SEQUENCE_NODE) return fail(ld, "gpus must be a list");
        size_t n = (size_t)(gpu_list->data.sequence.items.top - gpu_list->data.sequence.items.start);
        if (n < 1 || n > MAX_GPUS) return fail(ld, "gpus must list 1 to %d GPUs", MAX_GPUS);
        gpu_count = (unsigned int)n;
        for (unsigned int i = 0; i < gpu_count; i++) {
            yaml_node_t *item = yaml_document_get_node(ld->doc, gpu_list->data.sequence.items.start[i]);
            if (load_gpu(ld, item, i)) return -1;
        }
        for (unsigned int i = 0; i < gpu_count; i++)
            for (unsigned int j = 0; j < i; j++)
                if (!strcmp(gpus[i].uuid, gpus[j].uuid))
                    return fail(ld, "gpus[%u].uuid repeats gpus[%u].uuid", i, j);
    }
    if (timeline) {
        if (timeline->type != YAML_SEQUENCE_NODE) return fail(ld, "timeline must be a list");
        size_t n = (size_t)(timeline->data.sequence.items.top - timeline->data.sequence.items.start);
        actions = calloc(n ? n : 1, sizeof *actions);
        if (!actions) return fail(ld, "out of memory");
        for (size_t i = 0; i < n; i++) {
            yaml_node_t *item = yaml_document_get_node(ld->doc, timeline->data.sequence.items.start[i]);
            if (load_action(ld, item, i, &actions[i])) return -1;
        }
        action_count = n;
        /* Stable for equal times: insertion sort keeps the file's order, and timelines are short. */
        for (size_t i = 1; i < n; i++)
            for (size_t j = i; j > 0 && by_time(&actions[j - 1], &actions[j]) > 0; j--) {
                sim_action_t t = actions[j];
                actions[j] = actions[j - 1];
                actions[j - 1] = t;
            }
    }
    return 0;
}

/* Load the scenario once per process; 0 on success, else an NVML error (reason on stderr). */
static nvmlReturn_t ensure_loaded(void) {
    if (loaded) return NVML_SUCCESS;
    gpu_count = 8;
    for (unsigned int i = 0; i < gpu_count; i++) default_gpu(i);
    const char *path = getenv("GPUDELIVERY_NVML_SCENARIO");
    if (path && *path) {
        FILE *file = fopen(path, "rb");
        if (!file) {
            fprintf(stderr, "nvml-sim: %s: %s\n", path, strerror(errno));
            return NVML_ERROR_UNKNOWN;
        }
        yaml_parser_t parser;
        yaml_document_t doc;
        loader_t ld = {.doc = &doc, .path = path};
        yaml_parser_initialize(&parser);
        yaml_parser_set_input_file(&parser, file);
        int ok = yaml_parser_load(&parser, &doc);
        if (!ok) {
            fprintf(stderr, "nvml-sim: %s:%zu: %s\n", path, parser.problem_mark.line + 1,
                    parser.problem ? parser.problem : "cannot parse");
        } else {
            ok = load_scenario(&ld) == 0;
            if (!ok) fprintf(stderr, "nvml-sim: %s\n", ld.message);
            yaml_document_delete(&doc);
        }
        yaml_parser_delete(&parser);
        fclose(file);
        if (!ok) {
            free(actions);
            actions = NULL;
            action_count = 0;
            return NVML_ERROR_UNKNOWN;
        }
    }
    loaded = 1;
    return NVML_SUCCESS;
}

/* ---- the NVML API ------------------------------------------------------------------------ */

typedef sim_gpu_t *nvmlDevice_t;
typedef sim_event_set_t *nvmlEventSet_t;

typedef struct {
    unsigned int gpu, memory;
} nvmlUtilization_t;

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

#define EXPORT __attribute__((visibility("default")))

static nvmlReturn_t copy_text(char *out, unsigned int length, const char *text) {
    if (!out) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(text) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(out, text);
    return NVML_SUCCESS;
}

/* Validate a handle and bring the state up to now; the caller holds the lock. */
static nvmlReturn_t check_device(nvmlDevice_t device, const char *function, int allow_lost) {
    if (!init_count) return NVML_ERROR_UNINITIALIZED;
    if (!device || device < gpus || device >= gpus + gpu_count) return NVML_ERROR_INVALID_ARGUMENT;
    double now_s = scenario_now_s();
    advance(now_s);
    for (int i = 0; i < device->error_count; i++) {
        sim_error_t *e = &device->errors[i];
        if (now_s < e->until_s && (!strcmp(e->function, "*") || !strcmp(e->function, function)))
            return e->code;
    }
    if (device->lost && !allow_lost) return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

/* The body is variadic so that commas in it do not split the macro's arguments. */
#define DEVICE_CALL(device, allow_lost, ...)                                  \
    do {                                                                      \
        pthread_mutex_lock(&lock);                                            \
        nvmlReturn_t status_ = check_device((device), __func__, (allow_lost)); \
        if (status_ == NVML_SUCCESS) { __VA_ARGS__ }                          \
        pthread_mutex_unlock(&lock);                                          \
        return status_;                                                       \
    } while (0)

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&lock);
    nvmlReturn_t status = ensure_loaded();
    if (status == NVML_SUCCESS) init_count++;
    pthread_mutex_unlock(&lock);
    return status;
}

EXPORT nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
EXPORT nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

EXPORT nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    nvmlReturn_t status = init_count ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
    if (init_count) init_count--;
    pthread_mutex_unlock(&lock);
    return status;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    return copy_text(version, length, driver_version);
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    return copy_text(version, length, "12.550.54.15");
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    nvmlReturn_t status = init_count ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
    if (init_count) *count = gpu_count;
    pthread_mutex_unlock(&lock);
    return status;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!device) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    nvmlReturn_t status = !init_count ? NVML_ERROR_UNINITIALIZED
                          : index >= gpu_count ? NVML_ERROR_INVALID_ARGUMENT
                                               : NVML_SUCCESS;
    if (status == NVML_SUCCESS) *device = &gpus[index];
    pthread_mutex_unlock(&lock);
    return status;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    nvmlReturn_t status = init_count ? NVML_ERROR_NOT_FOUND : NVML_ERROR_UNINITIALIZED;
    for (unsigned int i = 0; init_count && i < gpu_count; i++)
        if (!strcmp(gpus[i].uuid, uuid)) {
            *device = &gpus[i];
            status = NVML_SUCCESS;
        }
    pthread_mutex_unlock(&lock);
    return status;
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    DEVICE_CALL(device, 1, { *index = device->index; });
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    DEVICE_CALL(device, 0, { status_ = copy_text(name, length, device->name); });
}

EXPORT nvmlReturn_t nvmlDeviceGetSerial(nvmlDevice_t device, char *serial, unsigned int length) {
    DEVICE_CALL(device, 0, { status_ = copy_text(serial, length, device->serial); });
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    DEVICE_CALL(device, 1, { status_ = copy_text(uuid, length, device->uuid); });
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    DEVICE_CALL(device, 1, {
        if (!pci) {
            status_ = NVML_ERROR_INVALID_ARGUMENT;
        } else {
            memset(pci, 0, sizeof *pci);
            sscanf(device->pci_bus_id, "%x:%x:%x", &pci->domain, &pci->bus, &pci->device);
            snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.0",
                     pci->domain & 0xffff, pci->bus, pci->device);
            snprintf(pci->busId, sizeof pci->busId, "%.31s", device->pci_bus_id);
            pci->pciDeviceId = device->pci_device_id;
            pci->pciSubSystemId = 0x16C110DE;
        }
    });
}

static unsigned long long used_bytes(const sim_gpu_t *gpu) {
    unsigned long long used = BASE_MEMORY_USED_MIB * MIB;
    for (int p = 0; p < gpu->process_count; p++) used += gpu->processes[p].used_bytes;
    return used < gpu->memory_total_bytes ? used : gpu->memory_total_bytes;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    DEVICE_CALL(device, 0, {
        if (!memory) {
            status_ = NVML_ERROR_INVALID_ARGUMENT;
        } else {
            memory->total = device->memory_total_bytes;
            memory->used = used_bytes(device);
            memory->free = memory->total - memory->used;
        }
    });
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    DEVICE_CALL(device, 0, {
        if (!memory) {
            status_ = NVML_ERROR_INVALID_ARGUMENT;
        } else {
            memory->total = device->memory_total_bytes;
            memory->reserved = BASE_MEMORY_USED_MIB * MIB;
            memory->used = used_bytes(device) - memory->reserved;
            memory->free = memory->total - memory->reserved - memory->used;
        }
    });
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *rates) {
    DEVICE_CALL(device, 0, {
        if (!rates) status_ = NVML_ERROR_INVALID_ARGUMENT;
        else rates->gpu = device->util_gpu, rates->memory = device->util_memory;
    });
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power_mw) {
    DEVICE_CALL(device, 0, { *power_mw = device->power_mw; });
}

EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit) {
    DEVICE_CALL(device, 0, { *limit = device->power_limit_mw; });
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit) {
    DEVICE_CALL(device, 0, { *limit = device->power_limit_mw; });
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device,
                                                        unsigned long long *energy_mj) {
    DEVICE_CALL(device, 0, { *energy_mj = (unsigned long long)device->energy_mj; });
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned int *temp) {
    DEVICE_CALL(device, 0, {
        if (sensor != NVML_TEMPERATURE_GPU || !temp) status_ = NVML_ERROR_INVALID_ARGUMENT;
        else *temp = device->temperature_c;
    });
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, int error_type,
                                                int counter_type, unsigned long long *count) {
    (void)counter_type;
    DEVICE_CALL(device, 0, {
        if (!count) status_ = NVML_ERROR_INVALID_ARGUMENT;
        else if (error_type == NVML_MEMORY_ERROR_TYPE_CORRECTED) *count = device->ecc_corrected;
        else if (error_type == NVML_MEMORY_ERROR_TYPE_UNCORRECTED) *count = device->ecc_uncorrected;
        else status_ = NVML_ERROR_INVALID_ARGUMENT;
    });
}

EXPORT nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *correctable,
                                              unsigned int *uncorrectable, unsigned int *pending,
                                              unsigned int *failure) {
    DEVICE_CALL(device, 0, {
        if (!correctable || !uncorrectable || !pending || !failure) {
            status_ = NVML_ERROR_INVALID_ARGUMENT;
        } else {
            *correctable = device->remapped_correctable;
            *uncorrectable = device->remapped_uncorrectable;
            *pending = device->remap_pending;
            *failure = device->remap_failed;
        }
    });
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device,
                                                            unsigned int *count,
                                                            nvmlProcessInfo_t *infos) {
    DEVICE_CALL(device, 0, {
        if (!count) {
            status_ = NVML_ERROR_INVALID_ARGUMENT;
        } else if (*count < (unsigned int)device->process_count || (!infos && device->process_count)) {
            *count = (unsigned int)device->process_count;
            status_ = NVML_ERROR_INSUFFICIENT_SIZE;
        } else {
            for (int p = 0; p < device->process_count; p++) {
                infos[p].pid = device->processes[p].pid;
                infos[p].usedGpuMemory = device->processes[p].used_bytes;
                infos[p].gpuInstanceId = 0xFFFFFFFFu;
                infos[p].computeInstanceId = 0xFFFFFFFFu;
            }
            *count = (unsigned int)device->process_count;
        }
    });
}

EXPORT nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device,
                                                     unsigned long long *types) {
    DEVICE_CALL(device, 1, { *types = EVENT_TYPE_XID_CRITICAL_ERROR; });
}

EXPORT nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    nvmlReturn_t status = init_count ? NVML_ERROR_UNKNOWN : NVML_ERROR_UNINITIALIZED;
    double now_s = scenario_now_s();
    for (int i = 0; init_count && i < MAX_EVENT_SETS; i++)
        if (!event_sets[i].used) {
            memset(&event_sets[i], 0, sizeof event_sets[i]);
            event_sets[i].used = 1;
            /* A set sees only what happens after it is created, as with the driver. */
            while (event_sets[i].cursor < action_count && actions[event_sets[i].cursor].at_s <= now_s)
                event_sets[i].cursor++;
            *set = &event_sets[i];
            status = NVML_SUCCESS;
            break;
        }
    pthread_mutex_unlock(&lock);
    return status;
}

EXPORT nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    if (!set || set < event_sets || set >= event_sets + MAX_EVENT_SETS) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    set->used = 0;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types,
                                             nvmlEventSet_t set) {
    if (!set || set < event_sets || set >= event_sets + MAX_EVENT_SETS || !set->used)
        return NVML_ERROR_INVALID_ARGUMENT;
    DEVICE_CALL(device, 0, {
        if (types & ~EVENT_TYPE_XID_CRITICAL_ERROR) status_ = NVML_ERROR_NOT_SUPPORTED;
        else set->types[device->index] |= types;
    });
}

/* The next XID due for `set`, or NULL; the caller holds the lock. */
static const sim_action_t *next_xid(nvmlEventSet_t set, double now_s) {
    while (set->cursor < action_count && actions[set->cursor].at_s <= now_s) {
        const sim_action_t *a = &actions[set->cursor++];
        if (!(a->fields & DO_XID)) continue;
        for (unsigned int i = 0; i < gpu_count; i++)
            if (a->gpu == (int)i && (set->types[i] & EVENT_TYPE_XID_CRITICAL_ERROR)) return a;
    }
    return NULL;
}

EXPORT nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data,
                                        unsigned int timeout_ms) {
    if (!set || set < event_sets || set >= event_sets + MAX_EVENT_SETS || !set->used || !data)
        return NVML_ERROR_INVALID_ARGUMENT;
    double deadline = real_now_s() + timeout_ms / 1000.0;
    for (;;) {
        pthread_mutex_lock(&lock);
        if (!init_count) {
            pthread_mutex_unlock(&lock);
            return NVML_ERROR_UNINITIALIZED;
        }
        double now_s = scenario_now_s();
        advance(now_s);
        const sim_action_t *xid = next_xid(set, now_s);
        if (xid) {
            memset(data, 0, sizeof *data);
            data->device = &gpus[xid->gpu];
            data->eventType = EVENT_TYPE_XID_CRITICAL_ERROR;
            data->eventData = xid->xid;
            data->gpuInstanceId = data->computeInstanceId = 0xFFFFFFFFu;
            pthread_mutex_unlock(&lock);
            return NVML_SUCCESS;
        }
        pthread_mutex_unlock(&lock);
        double left = deadline - real_now_s();
        if (left <= 0) return NVML_ERROR_TIMEOUT;
        /* Poll at 10 ms: XIDs are rare and the agent timestamps them at delivery. */
        struct timespec pause = {0, (long)(fmin(left, 0.01) * 1e9)};
        nanosleep(&pause, NULL);
    }
}

EXPORT nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_t *data,
                                     unsigned int timeout_ms) {
    return nvmlEventSetWait_v2(set, data, timeout_ms);
}
