/*
 * An emulated V4L2 camera for drape's tests, loaded with LD_PRELOAD into the real binary.
 *
 * It interposes the libc calls the `v4l` crate and drape make on a camera node -- open,
 * close, ioctl (which the crate issues through syscall(SYS_ioctl, ...)), mmap, munmap, poll,
 * and opendir/readdir/closedir for the listing of /dev -- for the paths named in the file that
 * DRAPE_V4L_EMU_CONFIG points at, and answers them the way the uvcvideo driver on top of
 * videobuf2 does: nearest-size S_FMT, bytesperline and sizeimage chosen by the driver,
 * nearest-interval S_PARM, REQBUFS granting what it can, buffers that must be mapped
 * MAP_SHARED and unmapped before they are freed, EBUSY for a format change with buffers
 * allocated, CLOCK_MONOTONIC start-of-exposure timestamps, a per-stream sequence counter, and
 * ENODEV from every call (POLLERR|POLLHUP from poll) once the camera is unplugged.
 * Everything else passes straight through to libc.
 *
 * Frames are produced on demand, one frame interval (the S_PARM one) after the previous, into
 * the oldest queued buffer, so a consumer that keeps a buffer queued sees every frame. Frame n
 * (counted from 0 over the whole process, reconnects included, dropped frames included) shows
 * image n mod N of the stream's `frames` list, and faults are scripted by frame number, never
 * by time, so a test's outcome does not depend on how fast the machine is.
 *
 * Config file, one directive per line ('#' starts a comment):
 *   device /dev/video73               the emulated capture node (required)
 *   meta_device /dev/video74          a UVC metadata node beside it: no video formats
 *   card NAME... | driver NAME | bus NAME
 *   mode FOURCC W H FPS...            a discrete size and its rates
 *   stepwise FOURCC MINW MAXW STEPW MINH MAXH STEPH FPS...   a continuous size range
 *   align W H                         the driver rounds S_FMT sizes to these multiples,
 *                                     whatever step it advertises (stepwise modes)
 *   stride_align N                    YUYV bytesperline is rounded up to a multiple of N
 *   max_buffers N                     REQBUFS grants at most N buffers
 *   latency MS                        buffers are stamped MS milliseconds before they are
 *                                     delivered (exposure plus USB transfer)
 *   frames FOURCC W H FILE...         what the sensor sends at that size: packed YUYV rows
 *                                     (ceil(W/2)*4 bytes each) or one JPEG per file
 *   eagain N K                        K spurious wake-ups before frame N: poll says readable,
 *                                     DQBUF says EAGAIN
 *   eintr N K                         poll is interrupted by a signal K times before frame N
 *   corrupt N                         frame N is cut short (half its bytes; MJPEG loses EOI)
 *   error N                           frame N carries V4L2_BUF_FLAG_ERROR
 *   drop N K                          frames N..N+K-1 are lost; the sequence number jumps
 *   unplug N K                        once frame N is dequeued the camera is unplugged; the
 *                                     next K opens fail with ENOENT, then it is back
 *   log FILE                          append one line per intercepted call to FILE, each
 *                                     prefixed with CLOCK_MONOTONIC in milliseconds
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/videodev2.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_MODES 32
#define MAX_FPS 8
#define MAX_FRAMESETS 8
#define MAX_FILES 16
#define MAX_FAULTS 32
#define MAX_HANDLES 16
#define MAX_BUFFERS 32
#define MAX_MAPPINGS 64
#define MAX_DIRS 8
#define PAGE 4096u

enum fault_kind { F_EAGAIN, F_EINTR, F_CORRUPT, F_ERROR, F_DROP, F_UNPLUG };

struct mode {
    uint32_t fourcc;
    int stepwise;
    uint32_t min_w, max_w, step_w, min_h, max_h, step_h; /* discrete: min == max, step 0 */
    uint32_t fps[MAX_FPS];
    int nfps;
};

struct frameset {
    uint32_t fourcc, w, h;
    unsigned char *data[MAX_FILES];
    size_t len[MAX_FILES];
    int n;
};

struct fault {
    enum fault_kind kind;
    uint64_t at;
    uint32_t count;
    uint32_t left;
    int done;
};

enum buf_state { B_DEQUEUED, B_QUEUED, B_DONE };

/* One plugged-in life of the camera; an unplug ends it, a replug starts a new one. */
struct instance {
    int gone;
    int refs;
    uint32_t fourcc, width, height, bytesperline, sizeimage;
    const struct mode *mode;
    uint32_t tpf_num, tpf_den;
    int owner_fd;
    uint32_t nbufs, buf_span;
    int memfd;
    enum buf_state state[MAX_BUFFERS];
    int mapped[MAX_BUFFERS];
    uint32_t bytesused[MAX_BUFFERS], flags[MAX_BUFFERS], seq[MAX_BUFFERS];
    uint64_t frameno[MAX_BUFFERS];
    struct timeval stamp[MAX_BUFFERS];
    int queued[MAX_BUFFERS], nqueued; /* FIFOs of buffer indices */
    int done[MAX_BUFFERS], ndone;
    int streaming;
    uint32_t sequence;
    struct timespec next_due;
};

struct handle {
    int fd;
    int meta;
    int nonblock;
    struct instance *inst;
};

struct mapping {
    void *addr;
    size_t len;
    struct instance *inst;
    uint32_t index;
};

struct dirtrack {
    DIR *dir;
    int emitted; /* how many synthetic entries were returned */
    struct dirent64 entry;
};

static struct {
    char device[256], meta_device[256];
    char card[32], driver[16], bus[32];
    struct mode modes[MAX_MODES];
    int nmodes;
    uint32_t align_w, align_h, stride_align, max_buffers, latency_ms;
    struct frameset framesets[MAX_FRAMESETS];
    int nframesets;
    struct fault faults[MAX_FAULTS];
    int nfaults;
    int log_fd;
} cfg = {.log_fd = -1};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static int active; /* a config was loaded */
static struct instance *present; /* NULL while unplugged */
static uint32_t failed_opens_left;
static uint64_t produced; /* frames the camera has produced (or dropped) so far */
static struct handle handles[MAX_HANDLES];
static struct mapping mappings[MAX_MAPPINGS];
static int nmappings; /* read without the lock as a fast path for munmap */
static struct dirtrack dirs[MAX_DIRS];

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_close)(int);
static int (*real_ioctl)(int, unsigned long, ...);
static long (*real_syscall)(long, ...);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static void *(*real_mmap64)(void *, size_t, int, int, int, off64_t);
static int (*real_munmap)(void *, size_t);
static int (*real_poll)(struct pollfd *, nfds_t, int);
static DIR *(*real_opendir)(const char *);
static struct dirent *(*real_readdir)(DIR *);
static struct dirent64 *(*real_readdir64)(DIR *);
static int (*real_closedir)(DIR *);

static void emu_log(const char *fmt, ...) {
    if (cfg.log_fd < 0)
        return;
    char line[512];
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    int at = snprintf(line, sizeof line, "%.3f ", now.tv_sec * 1e3 + now.tv_nsec / 1e6);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line + at, sizeof line - 1 - (size_t)at, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    n += at;
    if (n > (int)sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    ssize_t written = write(cfg.log_fd, line, (size_t)n);
    (void)written;
}

/* A broken config is a broken test: say why and stop the process. */
static void die(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "v4l_emu: %s\n", msg);
    _exit(97);
}

static uint32_t fourcc_of(const char *s) {
    if (strlen(s) != 4)
        die("fourcc `%s` is not four characters", s);
    return v4l2_fourcc(s[0], s[1], s[2], s[3]);
}

static uint32_t packed_row(uint32_t w) { return (w + 1) / 2 * 4; }

static unsigned char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f)
        die("cannot read frame file %s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *data = malloc(size > 0 ? (size_t)size : 1);
    if (!data || fread(data, 1, (size_t)size, f) != (size_t)size)
        die("cannot read frame file %s", path);
    fclose(f);
    *len = (size_t)size;
    return data;
}

static void add_fault(enum fault_kind kind, char **tok, int ntok, int nargs) {
    if (ntok != 1 + nargs)
        die("`%s` takes %d numbers", tok[0], nargs);
    if (cfg.nfaults == MAX_FAULTS)
        die("too many faults");
    struct fault *f = &cfg.faults[cfg.nfaults++];
    f->kind = kind;
    f->at = strtoull(tok[1], NULL, 10);
    f->count = nargs > 1 ? (uint32_t)strtoul(tok[2], NULL, 10) : 1;
    f->left = f->count;
}

static void load_config(void) {
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_close = dlsym(RTLD_NEXT, "close");
    real_ioctl = dlsym(RTLD_NEXT, "ioctl");
    real_syscall = dlsym(RTLD_NEXT, "syscall");
    real_mmap = dlsym(RTLD_NEXT, "mmap");
    real_mmap64 = dlsym(RTLD_NEXT, "mmap64");
    real_munmap = dlsym(RTLD_NEXT, "munmap");
    real_poll = dlsym(RTLD_NEXT, "poll");
    real_opendir = dlsym(RTLD_NEXT, "opendir");
    real_readdir = dlsym(RTLD_NEXT, "readdir");
    real_readdir64 = dlsym(RTLD_NEXT, "readdir64");
    real_closedir = dlsym(RTLD_NEXT, "closedir");

    const char *path = getenv("DRAPE_V4L_EMU_CONFIG");
    if (!path || !*path)
        return;
    FILE *f = fopen(path, "r");
    if (!f)
        die("cannot read config %s: %s", path, strerror(errno));
    strcpy(cfg.card, "Emulated UVC Camera");
    strcpy(cfg.driver, "uvcvideo");
    strcpy(cfg.bus, "usb-0000:00:14.0-1");
    cfg.align_w = cfg.align_h = cfg.stride_align = 1;
    cfg.max_buffers = MAX_BUFFERS;
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        char *hash = strchr(line, '#');
        if (hash)
            *hash = 0;
        char *tok[64];
        int ntok = 0;
        for (char *t = strtok(line, " \t\r\n"); t && ntok < 64; t = strtok(NULL, " \t\r\n"))
            tok[ntok++] = t;
        if (ntok == 0)
            continue;
        const char *key = tok[0];
        if (!strcmp(key, "device") && ntok == 2) {
            snprintf(cfg.device, sizeof cfg.device, "%s", tok[1]);
        } else if (!strcmp(key, "meta_device") && ntok == 2) {
            snprintf(cfg.meta_device, sizeof cfg.meta_device, "%s", tok[1]);
        } else if (!strcmp(key, "card") || !strcmp(key, "driver") || !strcmp(key, "bus")) {
            char joined[256] = "";
            for (int i = 1; i < ntok; i++) {
                if (i > 1)
                    strncat(joined, " ", sizeof joined - strlen(joined) - 1);
                strncat(joined, tok[i], sizeof joined - strlen(joined) - 1);
            }
            if (!strcmp(key, "card"))
                snprintf(cfg.card, sizeof cfg.card, "%s", joined);
            else if (!strcmp(key, "driver"))
                snprintf(cfg.driver, sizeof cfg.driver, "%s", joined);
            else
                snprintf(cfg.bus, sizeof cfg.bus, "%s", joined);
        } else if (!strcmp(key, "mode") || !strcmp(key, "stepwise")) {
            int step = !strcmp(key, "stepwise");
            int fixed = step ? 8 : 4;
            if (ntok < fixed + 1 || ntok > fixed + MAX_FPS || cfg.nmodes == MAX_MODES)
                die("bad `%s` line", key);
            struct mode *m = &cfg.modes[cfg.nmodes++];
            m->fourcc = fourcc_of(tok[1]);
            m->stepwise = step;
            uint32_t v[6];
            for (int i = 0; i < (step ? 6 : 2); i++)
                v[i] = (uint32_t)strtoul(tok[2 + i], NULL, 10);
            if (step) {
                m->min_w = v[0], m->max_w = v[1], m->step_w = v[2];
                m->min_h = v[3], m->max_h = v[4], m->step_h = v[5];
            } else {
                m->min_w = m->max_w = v[0];
                m->min_h = m->max_h = v[1];
            }
            for (int i = fixed; i < ntok; i++)
                m->fps[m->nfps++] = (uint32_t)strtoul(tok[i], NULL, 10);
        } else if (!strcmp(key, "align") && ntok == 3) {
            cfg.align_w = (uint32_t)strtoul(tok[1], NULL, 10);
            cfg.align_h = (uint32_t)strtoul(tok[2], NULL, 10);
        } else if (!strcmp(key, "stride_align") && ntok == 2) {
            cfg.stride_align = (uint32_t)strtoul(tok[1], NULL, 10);
        } else if (!strcmp(key, "latency") && ntok == 2) {
            cfg.latency_ms = (uint32_t)strtoul(tok[1], NULL, 10);
        } else if (!strcmp(key, "max_buffers") && ntok == 2) {
            cfg.max_buffers = (uint32_t)strtoul(tok[1], NULL, 10);
        } else if (!strcmp(key, "frames") && ntok >= 5) {
            if (cfg.nframesets == MAX_FRAMESETS || ntok - 4 > MAX_FILES)
                die("too many frame sets or files");
            struct frameset *s = &cfg.framesets[cfg.nframesets++];
            s->fourcc = fourcc_of(tok[1]);
            s->w = (uint32_t)strtoul(tok[2], NULL, 10);
            s->h = (uint32_t)strtoul(tok[3], NULL, 10);
            for (int i = 4; i < ntok; i++) {
                s->data[s->n] = slurp(tok[i], &s->len[s->n]);
                if (s->fourcc == V4L2_PIX_FMT_YUYV && s->len[s->n] != (size_t)packed_row(s->w) * s->h)
                    die("%s: %zu bytes, a packed %ux%u YUYV frame is %u", tok[i], s->len[s->n], s->w,
                        s->h, packed_row(s->w) * s->h);
                s->n++;
            }
        } else if (!strcmp(key, "eagain")) {
            add_fault(F_EAGAIN, tok, ntok, 2);
        } else if (!strcmp(key, "eintr")) {
            add_fault(F_EINTR, tok, ntok, 2);
        } else if (!strcmp(key, "corrupt")) {
            add_fault(F_CORRUPT, tok, ntok, 1);
        } else if (!strcmp(key, "error")) {
            add_fault(F_ERROR, tok, ntok, 1);
        } else if (!strcmp(key, "drop")) {
            add_fault(F_DROP, tok, ntok, 2);
        } else if (!strcmp(key, "unplug")) {
            add_fault(F_UNPLUG, tok, ntok, 2);
        } else if (!strcmp(key, "log") && ntok == 2) {
            cfg.log_fd = real_open(tok[1], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
            if (cfg.log_fd < 0)
                die("cannot write log %s: %s", tok[1], strerror(errno));
        } else {
            die("config line not understood: `%s` (%d words)", key, ntok);
        }
    }
    fclose(f);
    if (!cfg.device[0] || cfg.nmodes == 0)
        die("config needs a `device` and at least one `mode`");
    /* VIDIOC_ENUM_FRAMESIZES reports a continuous range as the only size of its format. */
    for (int i = 0; i < cfg.nmodes; i++)
        for (int j = 0; j < cfg.nmodes; j++)
            if (i != j && cfg.modes[i].stepwise && cfg.modes[i].fourcc == cfg.modes[j].fourcc)
                die("a `stepwise` format can have no other sizes");
    active = 1;
    emu_log("loaded %s: %d modes, %d frame sets, %d faults", path, cfg.nmodes, cfg.nframesets,
            cfg.nfaults);
}

static void init(void) { pthread_once(&once, load_config); }

/* --- the device ------------------------------------------------------------------------- */

static struct handle *find_handle(int fd) {
    for (int i = 0; i < MAX_HANDLES; i++)
        if (handles[i].inst && handles[i].fd == fd)
            return &handles[i];
    return NULL;
}

static void release_buffers(struct instance *in) {
    if (in->memfd >= 0)
        real_close(in->memfd);
    in->memfd = -1;
    in->nbufs = 0;
    in->nqueued = in->ndone = 0;
    in->streaming = 0;
    in->owner_fd = -1;
}

static void unref(struct instance *in) {
    if (--in->refs == 0) {
        release_buffers(in);
        free(in);
    }
}

static uint32_t round_to(uint32_t v, uint32_t step) {
    if (step <= 1)
        return v;
    return (v + step / 2) / step * step;
}

/* The driver's format for a size it has settled on. */
static void set_geometry(struct instance *in, uint32_t fourcc, uint32_t w, uint32_t h) {
    in->fourcc = fourcc;
    in->width = w;
    in->height = h;
    if (fourcc == V4L2_PIX_FMT_YUYV) {
        uint32_t a = cfg.stride_align;
        in->bytesperline = (packed_row(w) + a - 1) / a * a;
        in->sizeimage = in->bytesperline * h;
    } else {
        /* uvcvideo: compressed formats have no line length; the buffer holds the camera's
         * dwMaxVideoFrameBufferSize, typically two bytes per pixel. */
        in->bytesperline = 0;
        in->sizeimage = w * h * 2;
    }
}

static const struct mode *mode_for(uint32_t fourcc, uint32_t w, uint32_t h) {
    for (int i = 0; i < cfg.nmodes; i++) {
        const struct mode *m = &cfg.modes[i];
        if (m->fourcc == fourcc && w >= m->min_w && w <= m->max_w && h >= m->min_h && h <= m->max_h)
            return m;
    }
    return NULL;
}

/* uvc_v4l2_try_format: an unknown pixel format falls back to the first one; the size is the
 * advertised one closest in area difference; a continuous range clamps and rounds. */
static void choose_format(uint32_t want_fourcc, uint32_t want_w, uint32_t want_h, uint32_t *fourcc,
                          uint32_t *w, uint32_t *h) {
    *fourcc = cfg.modes[0].fourcc;
    *w = cfg.modes[0].max_w;
    *h = cfg.modes[0].max_h;
    for (int i = 0; i < cfg.nmodes; i++)
        if (cfg.modes[i].fourcc == want_fourcc)
            *fourcc = want_fourcc;
    uint64_t best = UINT64_MAX;
    for (int i = 0; i < cfg.nmodes; i++) {
        const struct mode *m = &cfg.modes[i];
        if (m->fourcc != *fourcc)
            continue;
        uint32_t cw, ch;
        if (m->stepwise) {
            cw = round_to(want_w < m->min_w ? m->min_w : want_w > m->max_w ? m->max_w : want_w, cfg.align_w);
            ch = round_to(want_h < m->min_h ? m->min_h : want_h > m->max_h ? m->max_h : want_h, cfg.align_h);
            while (cw > m->max_w)
                cw -= cfg.align_w;
            while (ch > m->max_h)
                ch -= cfg.align_h;
        } else {
            cw = m->min_w;
            ch = m->min_h;
        }
        uint64_t overlap = (uint64_t)(cw < want_w ? cw : want_w) * (ch < want_h ? ch : want_h);
        uint64_t d = (uint64_t)cw * ch + (uint64_t)want_w * want_h - 2 * overlap;
        if (d < best) {
            best = d;
            *w = cw;
            *h = ch;
        }
    }
}

static struct instance *new_instance(void) {
    struct instance *in = calloc(1, sizeof *in);
    if (!in)
        die("out of memory");
    in->refs = 1;
    in->memfd = -1;
    in->owner_fd = -1;
    const struct mode *m = &cfg.modes[0];
    set_geometry(in, m->fourcc, m->max_w, m->max_h);
    in->mode = m;
    in->tpf_num = 1;
    in->tpf_den = m->nfps ? m->fps[0] : 30;
    return in;
}

static const struct frameset *frames_for(const struct instance *in) {
    for (int i = 0; i < cfg.nframesets; i++) {
        const struct frameset *s = &cfg.framesets[i];
        if (s->fourcc == in->fourcc && s->w == in->width && s->h == in->height && s->n > 0)
            return s;
    }
    return NULL;
}

static struct fault *fault_at(enum fault_kind kind, uint64_t frame) {
    for (int i = 0; i < cfg.nfaults; i++) {
        struct fault *f = &cfg.faults[i];
        if (f->kind == kind && f->at == frame && !f->done)
            return f;
    }
    return NULL;
}

/* A transient error still owed before the next frame, consumed by the caller. */
static struct fault *transient(enum fault_kind kind) {
    struct fault *f = fault_at(kind, produced);
    if (f && f->left > 0)
        return f;
    return NULL;
}

static void now_mono(struct timespec *ts) { clock_gettime(CLOCK_MONOTONIC, ts); }

static int64_t ns_until(const struct timespec *t) {
    struct timespec now;
    now_mono(&now);
    return (int64_t)(t->tv_sec - now.tv_sec) * 1000000000 + (t->tv_nsec - now.tv_nsec);
}

/* Fills the oldest queued buffer with the next frame. */
static void produce(struct instance *in) {
    int idx = in->queued[0];
    memmove(in->queued, in->queued + 1, sizeof(int) * (size_t)--in->nqueued);

    struct fault *drop = fault_at(F_DROP, produced);
    if (drop) {
        drop->done = 1;
        produced += drop->count;
        in->sequence += drop->count;
        emu_log("frames %llu..%llu dropped", (unsigned long long)drop->at,
                (unsigned long long)(produced - 1));
    }
    const struct frameset *s = frames_for(in);
    const unsigned char *src = s->data[produced % (uint64_t)s->n];
    size_t len = s->len[produced % (uint64_t)s->n];
    unsigned char *buf = real_mmap(NULL, in->buf_span, PROT_READ | PROT_WRITE, MAP_SHARED, in->memfd,
                                   (off_t)idx * in->buf_span);
    if (buf == MAP_FAILED)
        die("mapping buffer %d: %s", idx, strerror(errno));
    uint32_t used, flags = 0;
    if (in->fourcc == V4L2_PIX_FMT_YUYV) {
        /* The sensor's packed rows laid out at the driver's line length; the padding is filled
         * with a pattern that shows up if anyone reads it as pixels. */
        uint32_t row = packed_row(in->width);
        for (uint32_t y = 0; y < in->height; y++) {
            memcpy(buf + (size_t)y * in->bytesperline, src + (size_t)y * row, row);
            memset(buf + (size_t)y * in->bytesperline + row, 0xA5, in->bytesperline - row);
        }
        used = in->sizeimage;
    } else if (len > in->sizeimage) {
        memcpy(buf, src, in->sizeimage);
        used = in->sizeimage;
        flags |= V4L2_BUF_FLAG_ERROR;
    } else {
        memcpy(buf, src, len);
        used = (uint32_t)len;
    }
    real_munmap(buf, in->buf_span);

    struct fault *f = fault_at(F_CORRUPT, produced);
    if (f) {
        f->done = 1;
        used /= 2;
        emu_log("frame %llu cut short to %u bytes", (unsigned long long)produced, used);
    }
    f = fault_at(F_ERROR, produced);
    if (f) {
        f->done = 1;
        flags |= V4L2_BUF_FLAG_ERROR;
        emu_log("frame %llu flagged as an error", (unsigned long long)produced);
    }
    struct timespec now;
    now_mono(&now);
    int64_t stamp_us = (int64_t)now.tv_sec * 1000000 + now.tv_nsec / 1000 - (int64_t)cfg.latency_ms * 1000;
    in->stamp[idx].tv_sec = (time_t)(stamp_us / 1000000);
    in->stamp[idx].tv_usec = (suseconds_t)(stamp_us % 1000000);
    in->bytesused[idx] = used;
    in->flags[idx] = flags;
    in->seq[idx] = in->sequence++;
    in->frameno[idx] = produced++;
    in->state[idx] = B_DONE;
    in->done[in->ndone++] = idx;

    uint64_t interval_ns = (uint64_t)in->tpf_num * 1000000000u / (in->tpf_den ? in->tpf_den : 30);
    in->next_due.tv_sec = now.tv_sec + (time_t)(interval_ns / 1000000000u);
    in->next_due.tv_nsec = now.tv_nsec + (long)(interval_ns % 1000000000u);
    if (in->next_due.tv_nsec >= 1000000000) {
        in->next_due.tv_sec++;
        in->next_due.tv_nsec -= 1000000000;
    }
}

/* Sleeps without the lock until `ns` have passed. */
static void sleep_unlocked(int64_t ns) {
    if (ns <= 0)
        return;
    struct timespec d = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    pthread_mutex_unlock(&lock);
    nanosleep(&d, NULL);
    pthread_mutex_lock(&lock);
}

/* Waits (up to timeout_ms; negative: forever) until a frame is done or the stream breaks.
 * Returns the poll revents, 0 on timeout, or -1 with errno set. */
static int wait_ready(struct handle *h, int timeout_ms) {
    struct timespec deadline;
    now_mono(&deadline);
    if (timeout_ms >= 0) {
        deadline.tv_sec += timeout_ms / 1000;
        deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
        if (deadline.tv_nsec >= 1000000000) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000;
        }
    }
    for (;;) {
        struct instance *in = h->inst;
        if (!in) {
            errno = EBADF;
            return -1;
        }
        /* v4l2_poll on an unregistered device. */
        if (in->gone)
            return POLLERR | POLLHUP | POLLPRI;
        /* vb2_core_poll: not streaming on this file. */
        if (!in->streaming || in->owner_fd != h->fd)
            return POLLERR;
        if (in->ndone > 0)
            return POLLIN | POLLRDNORM;
        struct fault *f = transient(F_EINTR);
        if (f) {
            f->left--;
            emu_log("poll interrupted before frame %llu", (unsigned long long)produced);
            errno = EINTR;
            return -1;
        }
        if (transient(F_EAGAIN))
            return POLLIN | POLLRDNORM;
        int64_t left = timeout_ms < 0 ? INT64_MAX : ns_until(&deadline);
        if (in->nqueued == 0 || ns_until(&in->next_due) > left) {
            if (left <= 0)
                return 0;
            /* Nothing can arrive before the deadline; wait in slices so a close or an unplug
             * from another thread is seen. */
            sleep_unlocked(left < 20000000 ? left : 20000000);
            continue;
        }
        int64_t due = ns_until(&in->next_due);
        if (due > 0) {
            sleep_unlocked(due);
            continue;
        }
        produce(in);
    }
}

static void unplug(void) {
    if (!present)
        return;
    present->gone = 1;
    emu_log("unplugged after frame %llu; %u opens will fail", (unsigned long long)(produced - 1),
            failed_opens_left);
    unref(present);
    present = NULL;
}

static int is_path(const char *path, const char *want) { return want[0] && path && !strcmp(path, want); }

static int emu_open(const char *path, int flags) {
    int meta = is_path(path, cfg.meta_device);
    if (!present) {
        if (failed_opens_left > 0) {
            /* Only the capture node's opens count as the attempts the script waits for. */
            if (!meta)
                failed_opens_left--;
            emu_log("open %s -> ENOENT (unplugged)", path);
            errno = ENOENT;
            return -1;
        }
        present = new_instance();
        emu_log("plugged in");
    }
    int slot = -1;
    for (int i = 0; i < MAX_HANDLES; i++)
        if (!handles[i].inst) {
            slot = i;
            break;
        }
    if (slot < 0) {
        errno = EMFILE;
        return -1;
    }
    /* A real descriptor, so the number is unique and close() has something to close. */
    int fd = real_open("/dev/null", O_RDWR | (flags & O_CLOEXEC));
    if (fd < 0)
        return -1;
    handles[slot] = (struct handle){fd, meta, (flags & O_NONBLOCK) != 0, present};
    present->refs++;
    emu_log("open %s%s -> fd %d", path, (flags & O_NONBLOCK) ? " O_NONBLOCK" : "", fd);
    return fd;
}

static void emu_close(struct handle *h) {
    struct instance *in = h->inst;
    emu_log("close fd %d%s", h->fd, in->owner_fd == h->fd ? " (frees its buffers)" : "");
    if (in->owner_fd == h->fd)
        release_buffers(in);
    h->inst = NULL;
    unref(in);
}

static const char *ioctl_name(unsigned int req) {
    switch (req) {
#define N(x) \
    case x:  \
        return #x;
        N(VIDIOC_QUERYCAP) N(VIDIOC_ENUM_FMT) N(VIDIOC_ENUM_FRAMESIZES) N(VIDIOC_ENUM_FRAMEINTERVALS)
        N(VIDIOC_G_FMT) N(VIDIOC_S_FMT) N(VIDIOC_TRY_FMT) N(VIDIOC_G_PARM) N(VIDIOC_S_PARM)
        N(VIDIOC_REQBUFS) N(VIDIOC_QUERYBUF) N(VIDIOC_QBUF) N(VIDIOC_DQBUF) N(VIDIOC_STREAMON)
        N(VIDIOC_STREAMOFF)
#undef N
    default:
        return NULL;
    }
}

static void fill_fmtdesc(struct v4l2_fmtdesc *d, uint32_t fourcc) {
    d->pixelformat = fourcc;
    d->flags = fourcc == V4L2_PIX_FMT_MJPEG ? V4L2_FMT_FLAG_COMPRESSED : 0;
    snprintf((char *)d->description, sizeof d->description, "%s",
             fourcc == V4L2_PIX_FMT_YUYV    ? "YUYV 4:2:2"
             : fourcc == V4L2_PIX_FMT_MJPEG ? "Motion-JPEG"
                                            : "Other");
}

static void fill_pix(const struct instance *in, struct v4l2_pix_format *p) {
    memset(p, 0, sizeof *p);
    p->width = in->width;
    p->height = in->height;
    p->pixelformat = in->fourcc;
    p->field = V4L2_FIELD_NONE;
    p->bytesperline = in->bytesperline;
    p->sizeimage = in->sizeimage;
    p->colorspace = V4L2_COLORSPACE_SRGB;
}

static void fill_buffer(const struct instance *in, uint32_t idx, struct v4l2_buffer *b) {
    b->index = idx;
    b->type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    b->memory = V4L2_MEMORY_MMAP;
    b->m.offset = idx * in->buf_span;
    b->length = in->sizeimage;
    b->field = V4L2_FIELD_NONE;
    b->flags = V4L2_BUF_FLAG_TIMESTAMP_MONOTONIC | V4L2_BUF_FLAG_TSTAMP_SRC_SOE;
    if (in->mapped[idx])
        b->flags |= V4L2_BUF_FLAG_MAPPED;
    if (in->state[idx] == B_QUEUED)
        b->flags |= V4L2_BUF_FLAG_QUEUED;
    if (in->state[idx] == B_DONE)
        b->flags |= V4L2_BUF_FLAG_DONE;
    b->bytesused = in->state[idx] == B_DEQUEUED || in->state[idx] == B_DONE ? in->bytesused[idx] : 0;
}

#define FAIL(e) \
    do {        \
        err = e; \
        goto out; \
    } while (0)

/* Called with the lock held. */
static int emu_ioctl(struct handle *h, unsigned int req, void *arg) {
    struct instance *in = h->inst;
    int err = 0;
    const char *name = ioctl_name(req);
    if (in->gone)
        FAIL(ENODEV);
    if (req == VIDIOC_QUERYCAP) {
        struct v4l2_capability *c = arg;
        memset(c, 0, sizeof *c);
        snprintf((char *)c->driver, sizeof c->driver, "%s", cfg.driver);
        snprintf((char *)c->card, sizeof c->card, "%s", cfg.card);
        snprintf((char *)c->bus_info, sizeof c->bus_info, "%s", cfg.bus);
        c->version = (6 << 16) | (1 << 8);
        uint32_t video = V4L2_CAP_VIDEO_CAPTURE | V4L2_CAP_STREAMING | V4L2_CAP_EXT_PIX_FORMAT;
        uint32_t meta = V4L2_CAP_META_CAPTURE | V4L2_CAP_STREAMING | V4L2_CAP_EXT_PIX_FORMAT;
        c->device_caps = h->meta ? meta : video;
        c->capabilities = video | meta | V4L2_CAP_DEVICE_CAPS;
        goto out;
    }
    /* A metadata node has no video formats, sizes or buffers. */
    if (h->meta)
        FAIL(EINVAL);
    switch (req) {
    case VIDIOC_ENUM_FMT: {
        struct v4l2_fmtdesc *d = arg;
        if (d->type != V4L2_BUF_TYPE_VIDEO_CAPTURE)
            FAIL(EINVAL);
        uint32_t seen[MAX_MODES];
        uint32_t n = 0;
        for (int i = 0; i < cfg.nmodes; i++) {
            int dup = 0;
            for (uint32_t j = 0; j < n; j++)
                dup |= seen[j] == cfg.modes[i].fourcc;
            if (!dup)
                seen[n++] = cfg.modes[i].fourcc;
        }
        if (d->index >= n)
            FAIL(EINVAL);
        fill_fmtdesc(d, seen[d->index]);
        break;
    }
    case VIDIOC_ENUM_FRAMESIZES: {
        struct v4l2_frmsizeenum *s = arg;
        uint32_t k = 0;
        for (int i = 0; i < cfg.nmodes; i++) {
            const struct mode *m = &cfg.modes[i];
            if (m->fourcc != s->pixel_format)
                continue;
            if (k++ != s->index)
                continue;
            if (m->stepwise) {
                s->type = V4L2_FRMSIZE_TYPE_STEPWISE;
                s->stepwise = (struct v4l2_frmsize_stepwise){m->min_w, m->max_w, m->step_w,
                                                             m->min_h, m->max_h, m->step_h};
            } else {
                s->type = V4L2_FRMSIZE_TYPE_DISCRETE;
                s->discrete.width = m->min_w;
                s->discrete.height = m->min_h;
            }
            goto out;
        }
        FAIL(EINVAL);
    }
    case VIDIOC_ENUM_FRAMEINTERVALS: {
        struct v4l2_frmivalenum *v = arg;
        const struct mode *m = mode_for(v->pixel_format, v->width, v->height);
        if (!m || v->index >= (uint32_t)m->nfps)
            FAIL(EINVAL);
        v->type = V4L2_FRMIVAL_TYPE_DISCRETE;
        v->discrete.numerator = 1;
        v->discrete.denominator = m->fps[v->index];
        break;
    }
    case VIDIOC_G_FMT: {
        struct v4l2_format *f = arg;
        if (f->type != V4L2_BUF_TYPE_VIDEO_CAPTURE)
            FAIL(EINVAL);
        fill_pix(in, &f->fmt.pix);
        break;
    }
    case VIDIOC_S_FMT:
    case VIDIOC_TRY_FMT: {
        struct v4l2_format *f = arg;
        if (f->type != V4L2_BUF_TYPE_VIDEO_CAPTURE)
            FAIL(EINVAL);
        /* uvc_v4l2_s_fmt: no format change while buffers are allocated. */
        if (req == VIDIOC_S_FMT && in->nbufs > 0)
            FAIL(EBUSY);
        uint32_t fourcc, w, hgt;
        choose_format(f->fmt.pix.pixelformat, f->fmt.pix.width, f->fmt.pix.height, &fourcc, &w, &hgt);
        emu_log("%s asked %.4s %ux%u, driver chose %.4s %ux%u", name, (char *)&f->fmt.pix.pixelformat,
                f->fmt.pix.width, f->fmt.pix.height, (char *)&fourcc, w, hgt);
        struct instance probe = *in;
        set_geometry(&probe, fourcc, w, hgt);
        fill_pix(&probe, &f->fmt.pix);
        if (req == VIDIOC_S_FMT) {
            set_geometry(in, fourcc, w, hgt);
            in->mode = mode_for(fourcc, w, hgt);
            /* A new format starts at its default (first listed) rate. */
            in->tpf_num = 1;
            in->tpf_den = in->mode->nfps ? in->mode->fps[0] : 30;
        }
        break;
    }
    case VIDIOC_G_PARM:
    case VIDIOC_S_PARM: {
        struct v4l2_streamparm *p = arg;
        if (p->type != V4L2_BUF_TYPE_VIDEO_CAPTURE)
            FAIL(EINVAL);
        struct v4l2_fract want = p->parm.capture.timeperframe;
        if (req == VIDIOC_S_PARM && want.numerator > 0 && want.denominator > 0 && in->mode->nfps > 0) {
            /* The advertised interval nearest the one asked for. */
            double want_fps = (double)want.denominator / want.numerator;
            uint32_t best = in->mode->fps[0];
            for (int i = 1; i < in->mode->nfps; i++) {
                double d = in->mode->fps[i] - want_fps, b = best - want_fps;
                if (d * d < b * b)
                    best = in->mode->fps[i];
            }
            in->tpf_num = 1;
            in->tpf_den = best;
            emu_log("VIDIOC_S_PARM asked %u/%u s, driver chose 1/%u s", want.numerator, want.denominator,
                    best);
        }
        memset(&p->parm, 0, sizeof p->parm);
        p->parm.capture.capability = V4L2_CAP_TIMEPERFRAME;
        p->parm.capture.timeperframe.numerator = in->tpf_num;
        p->parm.capture.timeperframe.denominator = in->tpf_den;
        p->parm.capture.readbuffers = in->nbufs;
        break;
    }
    case VIDIOC_REQBUFS: {
        struct v4l2_requestbuffers *r = arg;
        if (r->type != V4L2_BUF_TYPE_VIDEO_CAPTURE || r->memory != V4L2_MEMORY_MMAP)
            FAIL(EINVAL);
        if (in->owner_fd >= 0 && in->owner_fd != h->fd)
            FAIL(EBUSY);
        if (in->streaming)
            FAIL(EBUSY);
        /* vb2_core_reqbufs: buffers still mapped cannot be freed. */
        for (uint32_t i = 0; i < in->nbufs; i++)
            if (in->mapped[i])
                FAIL(EBUSY);
        release_buffers(in);
        r->capabilities = V4L2_BUF_CAP_SUPPORTS_MMAP;
        if (r->count == 0) {
            emu_log("VIDIOC_REQBUFS 0: buffers freed");
            break;
        }
        uint32_t n = r->count < cfg.max_buffers ? r->count : cfg.max_buffers;
        in->buf_span = (in->sizeimage + PAGE - 1) / PAGE * PAGE;
        in->memfd = memfd_create("v4l_emu", MFD_CLOEXEC);
        if (in->memfd < 0 || ftruncate(in->memfd, (off_t)n * in->buf_span) != 0)
            FAIL(ENOMEM);
        in->nbufs = n;
        in->owner_fd = h->fd;
        for (uint32_t i = 0; i < n; i++) {
            in->state[i] = B_DEQUEUED;
            in->mapped[i] = 0;
            in->bytesused[i] = 0;
        }
        emu_log("VIDIOC_REQBUFS asked %u, granted %u of %u bytes", r->count, n, in->sizeimage);
        r->count = n;
        break;
    }
    case VIDIOC_QUERYBUF:
    case VIDIOC_QBUF: {
        struct v4l2_buffer *b = arg;
        if (b->type != V4L2_BUF_TYPE_VIDEO_CAPTURE || b->memory != V4L2_MEMORY_MMAP ||
            b->index >= in->nbufs || in->owner_fd != h->fd)
            FAIL(EINVAL);
        if (req == VIDIOC_QBUF) {
            /* vb2: a buffer already queued or done cannot be queued again. */
            if (in->state[b->index] != B_DEQUEUED)
                FAIL(EINVAL);
            in->state[b->index] = B_QUEUED;
            in->queued[in->nqueued++] = (int)b->index;
        }
        fill_buffer(in, b->index, b);
        break;
    }
    case VIDIOC_DQBUF: {
        struct v4l2_buffer *b = arg;
        if (b->type != V4L2_BUF_TYPE_VIDEO_CAPTURE || b->memory != V4L2_MEMORY_MMAP ||
            in->owner_fd != h->fd || !in->streaming)
            FAIL(EINVAL);
        if (in->ndone == 0) {
            struct fault *f = transient(F_EAGAIN);
            if (f) {
                f->left--;
                emu_log("VIDIOC_DQBUF -> EAGAIN (spurious wake-up before frame %llu)",
                        (unsigned long long)produced);
                FAIL(EAGAIN);
            }
            if (in->nqueued > 0 && ns_until(&in->next_due) <= 0)
                produce(in);
            else if (h->nonblock)
                FAIL(EAGAIN);
            else {
                int ready = wait_ready(h, -1);
                if (ready < 0)
                    FAIL(errno);
                in = h->inst;
                if (in->gone)
                    FAIL(ENODEV);
                if (in->ndone == 0)
                    FAIL(EIO);
            }
        }
        uint32_t idx = (uint32_t)in->done[0];
        memmove(in->done, in->done + 1, sizeof(int) * (size_t)--in->ndone);
        in->state[idx] = B_DEQUEUED;
        fill_buffer(in, idx, b);
        b->flags |= in->flags[idx];
        b->timestamp = in->stamp[idx];
        b->sequence = in->seq[idx];
        emu_log("VIDIOC_DQBUF frame %llu: buffer %u, sequence %u, %u bytes%s",
                (unsigned long long)in->frameno[idx], idx, in->seq[idx], in->bytesused[idx],
                (in->flags[idx] & V4L2_BUF_FLAG_ERROR) ? ", ERROR flag" : "");
        struct fault *u = fault_at(F_UNPLUG, in->frameno[idx]);
        if (u) {
            u->done = 1;
            failed_opens_left = u->count;
            unplug();
        }
        goto out_logged;
    }
    case VIDIOC_STREAMON:
    case VIDIOC_STREAMOFF: {
        int *type = arg;
        if (*type != V4L2_BUF_TYPE_VIDEO_CAPTURE || in->nbufs == 0 || in->owner_fd != h->fd)
            FAIL(EINVAL);
        if (req == VIDIOC_STREAMON) {
            if (!frames_for(in)) {
                fprintf(stderr, "v4l_emu: no `frames` for %.4s %ux%u\n", (char *)&in->fourcc, in->width,
                        in->height);
                FAIL(EIO);
            }
            if (!in->streaming) {
                in->streaming = 1;
                in->sequence = 0;
                now_mono(&in->next_due);
            }
        } else {
            /* vb2: stopping returns every buffer to the application. */
            in->streaming = 0;
            for (uint32_t i = 0; i < in->nbufs; i++)
                in->state[i] = B_DEQUEUED;
            in->nqueued = in->ndone = 0;
        }
        break;
    }
    default:
        emu_log("ioctl 0x%08x (not emulated) -> ENOTTY", req);
        errno = ENOTTY;
        return -1;
    }
out:
    if (name)
        emu_log("%s -> %s", name, err ? strerrorname_np(err) : "0");
out_logged:
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}

/* --- interposed libc ---------------------------------------------------------------------- */

static int is_device(const char *path) {
    return active && (is_path(path, cfg.device) || is_path(path, cfg.meta_device));
}

static int open_common(int (*real)(const char *, int, ...), const char *path, int flags, va_list ap) {
    mode_t mode = (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0;
    if (is_device(path)) {
        pthread_mutex_lock(&lock);
        int fd = emu_open(path, flags);
        pthread_mutex_unlock(&lock);
        return fd;
    }
    return real(path, flags, mode);
}

int open(const char *path, int flags, ...) {
    init();
    va_list ap;
    va_start(ap, flags);
    int fd = open_common(real_open, path, flags, ap);
    va_end(ap);
    return fd;
}

int open64(const char *path, int flags, ...) {
    init();
    va_list ap;
    va_start(ap, flags);
    int fd = open_common(real_open64, path, flags, ap);
    va_end(ap);
    return fd;
}

int openat(int dirfd, const char *path, int flags, ...) {
    init();
    va_list ap;
    va_start(ap, flags);
    mode_t mode = (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0;
    va_end(ap);
    if (is_device(path)) {
        pthread_mutex_lock(&lock);
        int fd = emu_open(path, flags);
        pthread_mutex_unlock(&lock);
        return fd;
    }
    return real_openat(dirfd, path, flags, mode);
}

int close(int fd) {
    init();
    if (active) {
        pthread_mutex_lock(&lock);
        struct handle *h = find_handle(fd);
        if (h)
            emu_close(h);
        pthread_mutex_unlock(&lock);
    }
    return real_close(fd);
}

/* Returns 1 if fd is emulated, with *result the ioctl's return value. */
static int try_ioctl(int fd, unsigned long req, void *arg, long *result) {
    if (!active)
        return 0;
    pthread_mutex_lock(&lock);
    struct handle *h = find_handle(fd);
    if (h)
        *result = emu_ioctl(h, (unsigned int)req, arg);
    pthread_mutex_unlock(&lock);
    return h != NULL;
}

int ioctl(int fd, unsigned long req, ...) {
    init();
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    long result;
    if (try_ioctl(fd, req, arg, &result))
        return (int)result;
    return real_ioctl(fd, req, arg);
}

/* The v4l crate calls ioctl through syscall(SYS_ioctl, ...) to dodge libc's differing ioctl
 * prototypes, so the system call wrapper is where its requests arrive. */
long syscall(long number, ...) {
    init();
    va_list ap;
    va_start(ap, number);
    long a[6];
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    long result;
    if (number == SYS_ioctl && try_ioctl((int)a[0], (unsigned long)a[1], (void *)a[2], &result))
        return result;
    return real_syscall(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}

static void *emu_mmap(struct handle *h, size_t len, int prot, int flags, off_t off) {
    struct instance *in = h->inst;
    int err = 0;
    uint32_t idx = in->buf_span ? (uint32_t)(off / in->buf_span) : 0;
    if (in->gone)
        err = ENODEV;
    /* vb2_mmap: the offset must be a buffer's, the mapping shared and no longer than it. */
    else if (in->owner_fd != h->fd || idx >= in->nbufs || off % in->buf_span != 0 || len > in->buf_span ||
             !(flags & MAP_SHARED) || !(prot & PROT_READ))
        err = EINVAL;
    else if (nmappings == MAX_MAPPINGS)
        err = ENOMEM;
    if (err) {
        emu_log("mmap offset %lld length %zu -> %s", (long long)off, len, strerrorname_np(err));
        errno = err;
        return MAP_FAILED;
    }
    void *p = real_mmap(NULL, len, prot, flags, in->memfd, off);
    if (p == MAP_FAILED)
        return p;
    mappings[nmappings++] = (struct mapping){p, len, in, idx};
    in->mapped[idx]++;
    in->refs++;
    emu_log("mmap buffer %u (%zu bytes)", idx, len);
    return p;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    init();
    if (fd >= 0 && active) {
        pthread_mutex_lock(&lock);
        struct handle *h = find_handle(fd);
        void *p = h ? emu_mmap(h, len, prot, flags, off) : NULL;
        pthread_mutex_unlock(&lock);
        if (h)
            return p;
    }
    return real_mmap(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off) {
    init();
    if (fd >= 0 && active) {
        pthread_mutex_lock(&lock);
        struct handle *h = find_handle(fd);
        void *p = h ? emu_mmap(h, len, prot, flags, (off_t)off) : NULL;
        pthread_mutex_unlock(&lock);
        if (h)
            return p;
    }
    return real_mmap64(addr, len, prot, flags, fd, off);
}

int munmap(void *addr, size_t len) {
    init();
    if (__atomic_load_n(&nmappings, __ATOMIC_RELAXED) > 0) {
        pthread_mutex_lock(&lock);
        for (int i = 0; i < nmappings; i++) {
            if (mappings[i].addr != addr)
                continue;
            struct mapping m = mappings[i];
            mappings[i] = mappings[--nmappings];
            if (!m.inst->gone && m.index < m.inst->nbufs)
                m.inst->mapped[m.index]--;
            emu_log("munmap buffer %u", m.index);
            unref(m.inst);
            break;
        }
        pthread_mutex_unlock(&lock);
    }
    return real_munmap(addr, len);
}

int poll(struct pollfd *fds, nfds_t n, int timeout) {
    init();
    if (active && n == 1) {
        pthread_mutex_lock(&lock);
        struct handle *h = find_handle(fds[0].fd);
        if (h) {
            int ready = wait_ready(h, timeout);
            int saved = errno;
            pthread_mutex_unlock(&lock);
            if (ready < 0) {
                errno = saved;
                return -1;
            }
            fds[0].revents = (short)(ready & (fds[0].events | POLLERR | POLLHUP | POLLNVAL));
            return fds[0].revents ? 1 : 0;
        }
        pthread_mutex_unlock(&lock);
    }
    return real_poll(fds, n, timeout);
}

/* --- the node in its directory ------------------------------------------------------------- */

static int in_dir(const char *dir, const char *path) {
    const char *slash = strrchr(path, '/');
    if (!path[0] || !slash)
        return 0;
    size_t len = (size_t)(slash - path);
    size_t dlen = strlen(dir);
    while (dlen > 1 && dir[dlen - 1] == '/')
        dlen--;
    return dlen == len && !strncmp(dir, path, len);
}

DIR *opendir(const char *name) {
    init();
    DIR *d = real_opendir(name);
    if (d && active && (in_dir(name, cfg.device) || in_dir(name, cfg.meta_device))) {
        pthread_mutex_lock(&lock);
        for (int i = 0; i < MAX_DIRS; i++)
            if (!dirs[i].dir) {
                dirs[i].dir = d;
                dirs[i].emitted = 0;
                break;
            }
        pthread_mutex_unlock(&lock);
    }
    return d;
}

/* After the real entries, the emulated nodes, while the camera is plugged in. */
static struct dirent64 *synthetic(DIR *d) {
    struct dirent64 *out = NULL;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_DIRS; i++) {
        struct dirtrack *t = &dirs[i];
        if (t->dir != d)
            continue;
        int plugged = present || failed_opens_left == 0;
        const char *paths[2] = {cfg.device, cfg.meta_device};
        while (plugged && t->emitted < 2 && !out) {
            const char *p = paths[t->emitted++];
            if (!p[0])
                continue;
            memset(&t->entry, 0, sizeof t->entry);
            t->entry.d_ino = 0x7e57 + (ino64_t)t->emitted;
            t->entry.d_type = DT_CHR;
            t->entry.d_reclen = sizeof t->entry;
            snprintf(t->entry.d_name, sizeof t->entry.d_name, "%s", strrchr(p, '/') + 1);
            out = &t->entry;
        }
        break;
    }
    pthread_mutex_unlock(&lock);
    return out;
}

struct dirent64 *readdir64(DIR *d) {
    init();
    struct dirent64 *e = real_readdir64(d);
    return e || !active ? e : synthetic(d);
}

struct dirent *readdir(DIR *d) {
    init();
    struct dirent *e = real_readdir(d);
    return e || !active ? e : (struct dirent *)synthetic(d);
}

int closedir(DIR *d) {
    init();
    if (active) {
        pthread_mutex_lock(&lock);
        for (int i = 0; i < MAX_DIRS; i++)
            if (dirs[i].dir == d)
                dirs[i].dir = NULL;
        pthread_mutex_unlock(&lock);
    }
    return real_closedir(d);
}
