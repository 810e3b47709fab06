/* The relay's per-copy loop, compiled: what `slot.Slot.push` and `fastpath.RtpOut.send`
 * do in Python, for every slot carrying one source, in one call per incoming packet.
 *
 * Built by `server/media/native.py` (the C compiler, no Python headers: loaded by cffi in
 * ABI mode); where it cannot be built the same state is driven by the Python code, which
 * stays the reference (`tests/media/test_native.py` runs both and compares the bytes).
 * The state lives in the structs below, allocated and owned by Python objects (a Slot
 * keeps its `lk_slot`, an RtpOut its `lk_out`, a sendmmsg.Batch its `lk_batch`); this file
 * allocates nothing and keeps no pointer across calls. SRTP is libsrtp's `srtp_protect`,
 * reached through the function pointer pylibsrtp's own binding exports.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

/* cdef-begin: read by native.py as cffi declarations (keep to plain C, no macros) */
struct lk_batch {
    int32_t fd;        /* -1 once its socket closed: what is queued is dropped */
    int32_t count;     /* datagrams queued */
    int32_t capacity;
    int32_t slot;      /* bytes of the arena per datagram */
    char *arena;
    struct mmsghdr *msgs;
    uint64_t sent;
    uint64_t dropped;
    uint64_t calls;    /* sendmmsg system calls made */
};

struct lk_out {
    int32_t ready;     /* 1: bound (SRTP session, batch, address valid), sent from here */
    int32_t room;      /* largest datagram before SRTP's trailer */
    void *srtp;        /* the listener's libsrtp context (srtp_t) */
    struct lk_batch *batch;
    void *name;        /* its socket address, as sendmmsg takes it */
    uint32_t namelen;
    uint32_t ssrc;
    uint32_t origin;
    uint32_t last_timestamp;
    uint16_t seq;
    uint8_t payload_type;
    uint8_t level_at;  /* offset of the audio-level byte in ext[1] */
    uint8_t first[2];  /* first header byte without / with a level */
    uint8_t ext_len[2];
    uint8_t ext[2][64];
    uint64_t sent;
    uint64_t octets;
    uint64_t bytes;
    double last_now;
};

struct lk_slot {
    struct lk_out *out;  /* NULL (or not ready): the copy is left to Python */
    int32_t live;
    int32_t marker;
    int32_t has_in;
    int32_t has_out;
    int64_t last_in;
    int64_t offset;
    int64_t last_out;
    double last_out_time;
    int64_t pts;          /* a copy left to Python: its pts and marker */
    int32_t left_marker;
};

typedef int (*lk_protect_fn)(void *ctx, void *rtp, int *len);

int lk_flush(struct lk_batch *batch);
int lk_send(struct lk_out *out, int64_t pts, const char *payload, int32_t size, int32_t level,
            int32_t marker, double now, lk_protect_fn protect);
int32_t lk_fanout(struct lk_slot **slots, int32_t n, uint32_t timestamp, const char *payload,
                  int32_t size, int32_t level, double now, lk_protect_fn protect, int32_t *left);
/* cdef-end */

#define OPUS_CLOCK 48000
#define FRAME_SAMPLES 960
#define HALF ((int64_t)1 << 31)
#define MASK (((int64_t)1 << 32) - 1)
#define MAX_TOUCHED 8

/* Send what is queued (`sendmmsg.Batch.flush`, same rules): a datagram the kernel
 * refuses for its address is skipped, a full buffer drops the rest (as UDP would). */
int lk_flush(struct lk_batch *b)
{
    int count = b->count, start = 0;
    b->count = 0;
    if (b->fd < 0) {
        b->dropped += count;
        return 0;
    }
    while (start < count) {
        int sent = sendmmsg(b->fd, b->msgs + start, count - start, 0);
        b->calls += 1;
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == ENOBUFS) {
                b->dropped += count - start;
                break;
            }
            b->dropped += 1;
            start += 1;
            continue;
        }
        start += sent;
        b->sent += sent;
    }
    return 0;
}

static inline void be16(unsigned char *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }
static inline void be32(unsigned char *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }

/* `RtpOut.send` once bound: header, extensions and payload written into the next slot of
 * the batch, protected there, committed. 1 if queued. The batch is flushed when full;
 * the caller flushes the rest. */
int lk_send(struct lk_out *o, int64_t pts, const char *payload, int32_t size, int32_t level,
            int32_t marker, double now, lk_protect_fn protect)
{
    struct lk_batch *b = o->batch;
    int t = level >= 0;
    int start = 12 + o->ext_len[t], end = start + size, length = end;
    uint32_t timestamp = (uint32_t)((int64_t)o->origin + pts);
    if (end > o->room || end > b->slot)
        return 0;
    if (b->count == b->capacity)
        lk_flush(b);
    int index = b->count;
    unsigned char *p = (unsigned char *)b->arena + (size_t)index * b->slot;
    p[0] = o->first[t];
    p[1] = o->payload_type | (marker ? 0x80 : 0);
    be16(p + 2, o->seq);
    be32(p + 4, timestamp);
    be32(p + 8, o->ssrc);
    memcpy(p + 12, o->ext[t], o->ext_len[t]);
    if (t)
        p[12 + o->level_at] = level & 0x7f;
    memcpy(p + start, payload, size);
    if (protect(o->srtp, p, &length))
        return 0;
    struct msghdr *h = &b->msgs[index].msg_hdr;
    h->msg_iov->iov_len = length;
    if (h->msg_name != o->name) {
        h->msg_name = o->name;
        h->msg_namelen = o->namelen;
    }
    b->count = index + 1;
    o->seq += 1;
    o->sent += 1;
    o->octets += size;
    o->bytes += length;
    o->last_now = now;
    o->last_timestamp = timestamp;
    return 1;
}

/* `Slot.push` for each of `slots`, then each copy sent by `lk_send` where its output is
 * ready. Copies that are not (no output here, not connected yet) are left to Python: their
 * indices go to `left` (their pts and marker in the slot), and the count is returned.
 * Every batch written to is flushed before returning. */
int32_t lk_fanout(struct lk_slot **slots, int32_t n, uint32_t timestamp, const char *payload,
                  int32_t size, int32_t level, double now, lk_protect_fn protect, int32_t *left)
{
    struct lk_batch *touched[MAX_TOUCHED];
    int ntouched = 0, nleft = 0;
    for (int i = 0; i < n; i++) {
        struct lk_slot *s = slots[i];
        int64_t in_ts;
        if (!s->has_in) {
            if (!s->has_out) {
                s->offset = -(int64_t)timestamp;
            } else {
                /* continue after the last packet sent, leaving the real gap (whole frames) */
                double frames = (now - s->last_out_time) * OPUS_CLOCK / FRAME_SAMPLES;
                int64_t whole = (int64_t)__builtin_nearbyint(frames);
                if (whole < 1)
                    whole = 1;
                s->offset = s->last_out + whole * FRAME_SAMPLES - (int64_t)timestamp;
            }
            in_ts = timestamp;
            s->has_in = 1;
        } else {
            in_ts = s->last_in + ((((int64_t)timestamp - s->last_in + HALF) & MASK) - HALF);
        }
        s->last_in = in_ts;
        if (!s->live)
            continue;
        int64_t pts = in_ts + s->offset;
        int marker = s->marker;
        s->marker = 0;
        struct lk_out *o = s->out;
        if (o != NULL && o->ready) {
            struct lk_batch *b = o->batch;
            lk_send(o, pts, payload, size, level, marker, now, protect);
            int k = 0;
            while (k < ntouched && touched[k] != b)
                k++;
            if (k == ntouched) {
                if (ntouched == MAX_TOUCHED)
                    lk_flush(touched[--ntouched]);
                touched[ntouched++] = b;
            }
        } else {
            s->pts = pts;
            s->left_marker = marker;
            left[nleft++] = i;
        }
        if (!s->has_out || pts > s->last_out) {
            s->last_out = pts;
            s->has_out = 1;
        }
        s->last_out_time = now;
    }
    for (int k = 0; k < ntouched; k++)
        if (touched[k]->count)
            lk_flush(touched[k]);
    return nleft;
}
