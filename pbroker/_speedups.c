/*
 * pbroker._speedups: the banana codec's hot loops in C.
 *
 * - scan() is a drop-in for pbroker.banana._scanPython: same arguments, same result, same
 *   errors, for any split of the input. banana.py keeps everything around the loop (buffer
 *   keeping, limits, messages); scan() only turns bytes into tokens and tokens into lists.
 * - Leaves writes the jelly encoder's common leaves (see pbroker._jellier.Jellier._emit).
 * - plain() builds the unjellier's plain expressions (see pbroker._unjellier.Unjellier).
 * - extent() counts what the native codec would pack for a value (see pbroker._native).
 *
 * Each has a pure-Python twin that gives the same results; the differential fuzzers in
 * tests/test_fuzz.py hold each pair to each other.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

/* The error codes of pbroker.banana (_ERROR_*). */
enum {
    ERROR_PREFIX = 1,
    ERROR_NO_VOCABULARY = 2,
    ERROR_NOT_IN_VOCABULARY = 3,
    ERROR_STRING_SIZE = 4,
    ERROR_MESSAGE_SIZE = 5,
    ERROR_LIST_SIZE = 6,
    ERROR_DEPTH = 7,
    ERROR_TYPE_BYTE = 8,
};

/* What follows a LIST token of two elements when they are jelly's text. */
static const unsigned char TEXT_TAG[9] = {0x07, 0x82, 'u', 'n', 'i', 'c', 'o', 'd', 'e'};

/* Limits are clamped here; banana.py scans in Python when sizeLimit is larger. */
#define LIMIT_CEILING ((Py_ssize_t)1 << 62)

static int
toLimit(PyObject *number, Py_ssize_t ceiling, Py_ssize_t *out)
{
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(number, &overflow);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow > 0 || value > ceiling) {
        value = ceiling;
    }
    else if (overflow < 0) {
        value = -1;
    }
    *out = (Py_ssize_t)value;
    return 0;
}

static double
unpackDouble(const unsigned char *p)
{
#if PY_VERSION_HEX >= 0x030B0000
    return PyFloat_Unpack8((const char *)p, 0);
#else
    return _PyFloat_Unpack8(p, 0);
#endif
}

/* The integer of a prefix too long for 64 bits: digits least significant first. */
static PyObject *
bigInteger(const unsigned char *digits, Py_ssize_t count)
{
    PyObject *value = PyLong_FromLong(0);
    PyObject *seven = PyLong_FromLong(7);
    if (value == NULL || seven == NULL) {
        goto fail;
    }
    for (Py_ssize_t i = count - 1; i >= 0; i--) {
        PyObject *shifted = PyNumber_Lshift(value, seven);
        Py_DECREF(value);
        value = NULL;
        if (shifted == NULL) {
            goto fail;
        }
        PyObject *digit = PyLong_FromLong(digits[i]);
        if (digit == NULL) {
            Py_DECREF(shifted);
            goto fail;
        }
        value = PyNumber_Or(shifted, digit);
        Py_DECREF(shifted);
        Py_DECREF(digit);
        if (value == NULL) {
            goto fail;
        }
    }
    Py_DECREF(seven);
    return value;
fail:
    Py_XDECREF(value);
    Py_XDECREF(seven);
    return NULL;
}

static PyObject *
scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 14) {
        PyErr_Format(PyExc_TypeError, "scan() takes 14 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *vocabulary = args[3];
    PyObject *parents = args[11];
    PyObject *results = args[13];
    if (vocabulary != Py_None && !PyDict_Check(vocabulary)) {
        PyErr_SetString(PyExc_TypeError, "scan(): vocabulary must be a dict or None");
        return NULL;
    }
    if (!PyList_Check(parents) || !PyList_Check(results)) {
        PyErr_SetString(PyExc_TypeError, "scan(): parents and results must be lists");
        return NULL;
    }
    if (args[9] != Py_None && !PyList_Check(args[9])) {
        PyErr_SetString(PyExc_TypeError, "scan(): current must be a list or None");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t expressionStart = PyLong_AsSsize_t(args[2]);
    if (expressionStart == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t sizeLimit, prefixLimit, depthLimit, messageSizeLimit = -1;
    if (toLimit(args[4], LIMIT_CEILING, &sizeLimit) < 0
        || toLimit(args[5], LIMIT_CEILING, &prefixLimit) < 0
        || toLimit(args[6], LIMIT_CEILING, &depthLimit) < 0) {
        return NULL;
    }
    /* Not clamped at 2**62: a string of up to sizeLimit (<= 2**62) bytes plus its header is
     * checked against it exactly, as in Python. */
    if (args[7] != Py_None && toLimit(args[7], PY_SSIZE_T_MAX, &messageSizeLimit) < 0) {
        return NULL;
    }
    int text = PyObject_IsTrue(args[8]);
    if (text < 0) {
        return NULL;
    }
    Py_ssize_t remaining = PyLong_AsSsize_t(args[10]);
    if (remaining == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int wantedOverflow = 0;
    long long wantedValue = PyLong_AsLongLongAndOverflow(args[12], &wantedOverflow);
    if (wantedValue == -1 && PyErr_Occurred()) {
        return NULL;
    }
    /* A bound no list can reach is no bound. */
    Py_ssize_t wanted = wantedOverflow || wantedValue > PY_SSIZE_T_MAX
        ? -1 : (Py_ssize_t)wantedValue;

    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)view.buf;
    const Py_ssize_t end = view.len;
    if (pos < 0 || pos > end) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "scan(): position out of range");
        return NULL;
    }

    /* The list being filled (a strong reference, or NULL) and the error found, if any. */
    PyObject *current = args[9] == Py_None ? NULL : args[9];
    Py_XINCREF(current);
    int error = 0;
    PyObject *errorValue = NULL;
    PyObject *item = NULL;

    while (pos < end) {
        const Py_ssize_t start = pos;
        unsigned int kind = buf[pos++];
        uint64_t value = 0;
        /* The value when it takes more than 63 bits. */
        PyObject *big = NULL;
        if (kind < 0x80) {
            value = kind;
            if (pos == end) {
                pos = start;
                break;
            }
            kind = buf[pos++];
            if (kind < 0x80) {
                /* A prefix of two bytes or more: the slow path, bounded by prefixLimit. */
                value |= (uint64_t)kind << 7;
                int shift = 14;
                int typed = 0;
                int wide = 0; /* a digit above bit 62 is set */
                while (pos != end) {
                    kind = buf[pos++];
                    if (kind >= 0x80) {
                        typed = 1;
                        break;
                    }
                    if (pos - start > prefixLimit) {
                        error = ERROR_PREFIX;
                        goto done;
                    }
                    if (shift <= 56) {
                        value |= (uint64_t)kind << shift;
                    }
                    else if (kind != 0) {
                        wide = 1;
                    }
                    if (shift < 63) {
                        shift += 7; /* (stops at 63: an int would overflow on long prefixes) */
                    }
                }
                if (!typed) {
                    if (pos - start > prefixLimit) {
                        error = ERROR_PREFIX;
                        goto done;
                    }
                    pos = start;
                    break; /* the type byte has not arrived yet */
                }
                if (pos - start > prefixLimit + 1) {
                    error = ERROR_PREFIX;
                    goto done;
                }
                if (wide) {
                    big = bigInteger(buf + start, pos - 1 - start);
                    if (big == NULL) {
                        goto fail;
                    }
                }
            }
        }

        switch (kind) {
        case 0x81: /* INT */
        case 0x85: /* LONGINT */
            if (big != NULL) {
                item = big;
                big = NULL;
            }
            else {
                item = PyLong_FromUnsignedLongLong(value);
            }
            break;
        case 0x83: /* NEG */
        case 0x86: /* LONGNEG */
            if (big != NULL) {
                item = PyNumber_Negative(big);
                Py_CLEAR(big);
            }
            else {
                item = PyLong_FromLongLong(-(long long)value);
            }
            break;
        case 0x87: /* VOCAB */
        {
            PyObject *number = big != NULL ? big : PyLong_FromUnsignedLongLong(value);
            big = NULL;
            if (number == NULL) {
                goto fail;
            }
            if (vocabulary == Py_None) {
                error = ERROR_NO_VOCABULARY;
                errorValue = number;
                goto done;
            }
            item = PyDict_GetItemWithError(vocabulary, number);
            if (item == NULL) {
                if (PyErr_Occurred()) {
                    Py_DECREF(number);
                    goto fail;
                }
                error = ERROR_NOT_IN_VOCABULARY;
                errorValue = number;
                goto done;
            }
            Py_DECREF(number);
            Py_INCREF(item);
            break;
        }
        case 0x82: /* STRING */
            if (big != NULL || value > (uint64_t)sizeLimit) {
                error = ERROR_STRING_SIZE;
                errorValue = big != NULL ? big : PyLong_FromUnsignedLongLong(value);
                big = NULL;
                goto done;
            }
            if (messageSizeLimit >= 0
                && (Py_ssize_t)value > messageSizeLimit - (pos - expressionStart)) {
                error = ERROR_MESSAGE_SIZE;
                goto done;
            }
            if (end - pos < (Py_ssize_t)value) {
                pos = start;
                goto done;
            }
            item = PyBytes_FromStringAndSize((const char *)buf + pos, (Py_ssize_t)value);
            pos += (Py_ssize_t)value;
            break;
        case 0x80: /* LIST */
        {
            if (big != NULL || value > (uint64_t)sizeLimit) {
                error = ERROR_LIST_SIZE;
                errorValue = big != NULL ? big : PyLong_FromUnsignedLongLong(value);
                big = NULL;
                goto done;
            }
            if (messageSizeLimit >= 0 && pos - expressionStart > messageSizeLimit) {
                error = ERROR_MESSAGE_SIZE;
                goto done;
            }
            if (current != NULL && PyList_GET_SIZE(parents) + 2 > depthLimit) {
                error = ERROR_DEPTH;
                goto done;
            }
            if (value == 2 && text && current != NULL) {
                /* Jelly's text, [b"unicode", <bytes>], as a str: see _scanPython. */
                const Py_ssize_t textStart = pos + 9;
                if (end - textStart >= 2) {
                    if (memcmp(buf + pos, TEXT_TAG, 9) == 0) {
                        const Py_ssize_t size = buf[textStart];
                        const Py_ssize_t textEnd = textStart + 2 + size;
                        if (size < 0x80 && buf[textStart + 1] == 0x82
                            && (messageSizeLimit < 0
                                || textEnd - expressionStart <= messageSizeLimit)) {
                            if (textEnd > end) {
                                pos = start;
                                goto done;
                            }
                            item = PyUnicode_DecodeUTF8(
                                (const char *)buf + textStart + 2, size, NULL);
                            if (item == NULL) {
                                if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                                    goto fail;
                                }
                                PyErr_Clear(); /* the unjellier reports it */
                            }
                            else {
                                pos = textEnd;
                                break;
                            }
                        }
                    }
                }
                else {
                    const Py_ssize_t have = (textStart < end ? textStart : end) - pos;
                    if (memcmp(buf + pos, TEXT_TAG, (size_t)have) == 0
                        && (textStart >= end || buf[textStart] < 0x80)
                        && (messageSizeLimit < 0
                            || textStart - expressionStart <= messageSizeLimit)) {
                        pos = start;
                        goto done; /* too little has come to tell */
                    }
                }
            }
            PyObject *opened = PyList_New(0);
            if (opened == NULL) {
                goto fail;
            }
            if (value == 0) {
                item = opened;
                break;
            }
            if (current != NULL) {
                PyObject *parent = Py_BuildValue("(Nn)", current, remaining);
                current = NULL;
                if (parent == NULL) {
                    Py_DECREF(opened);
                    goto fail;
                }
                int appended = PyList_Append(parents, parent);
                Py_DECREF(parent);
                if (appended < 0) {
                    Py_DECREF(opened);
                    goto fail;
                }
            }
            current = opened;
            remaining = (Py_ssize_t)value;
            continue;
        }
        case 0x84: /* FLOAT; a prefix before it means nothing, as in Twisted */
            Py_CLEAR(big);
            if (end - pos < 8) {
                pos = start;
                goto done;
            }
            item = PyFloat_FromDouble(unpackDouble(buf + pos));
            pos += 8;
            break;
        default:
            Py_CLEAR(big);
            error = ERROR_TYPE_BYTE;
            errorValue = PyLong_FromLong((long)kind);
            goto done;
        }
        if (item == NULL) {
            goto fail;
        }

        /* Place the finished element, closing every list it completes. */
        if (current != NULL) {
            int appended = PyList_Append(current, item);
            Py_CLEAR(item);
            if (appended < 0) {
                goto fail;
            }
            if (--remaining) {
                continue;
            }
            if (messageSizeLimit >= 0 && pos - expressionStart > messageSizeLimit) {
                error = ERROR_MESSAGE_SIZE;
                goto done;
            }
            item = current;
            current = NULL;
            Py_ssize_t depth;
            while ((depth = PyList_GET_SIZE(parents)) > 0) {
                PyObject *parent = PyList_GET_ITEM(parents, depth - 1);
                if (!PyTuple_Check(parent) || PyTuple_GET_SIZE(parent) != 2) {
                    PyErr_SetString(PyExc_TypeError, "scan(): malformed parents");
                    goto fail;
                }
                PyObject *list = PyTuple_GET_ITEM(parent, 0);
                Py_ssize_t left = PyLong_AsSsize_t(PyTuple_GET_ITEM(parent, 1));
                if (left == -1 && PyErr_Occurred()) {
                    goto fail;
                }
                Py_INCREF(list);
                if (PyList_SetSlice(parents, depth - 1, depth, NULL) < 0
                    || PyList_Append(list, item) < 0) {
                    Py_DECREF(list);
                    goto fail;
                }
                Py_DECREF(item);
                item = list;
                if (--left) {
                    current = list;
                    item = NULL;
                    remaining = left;
                    break;
                }
            }
            if (current != NULL) {
                continue;
            }
        }
        else if (messageSizeLimit >= 0 && pos - expressionStart > messageSizeLimit) {
            error = ERROR_MESSAGE_SIZE;
            goto done;
        }
        {
            int appended = PyList_Append(results, item);
            Py_CLEAR(item);
            if (appended < 0) {
                goto fail;
            }
        }
        expressionStart = pos;
        if (PyList_GET_SIZE(results) == wanted) {
            break;
        }
    }

done:
    PyBuffer_Release(&view);
    Py_XDECREF(item);
    {
        PyObject *reported;
        if (error) {
            if (errorValue == NULL) {
                if (PyErr_Occurred()) {
                    Py_XDECREF(current);
                    return NULL;
                }
                errorValue = PyLong_FromLong(0);
            }
            if (errorValue == NULL) {
                Py_XDECREF(current);
                return NULL;
            }
            reported = Py_BuildValue("(iN)", error, errorValue);
            if (reported == NULL) {
                Py_XDECREF(current);
                return NULL;
            }
        }
        else {
            reported = Py_NewRef(Py_None);
        }
        return Py_BuildValue(
            "(nNnnN)",
            pos,
            current != NULL ? current : Py_NewRef(Py_None),
            remaining,
            expressionStart,
            reported);
    }

fail:
    PyBuffer_Release(&view);
    Py_XDECREF(item);
    Py_XDECREF(current);
    Py_XDECREF(errorValue);
    return NULL;
}

/*
 * Leaves: the jelly encoder's common leaves as banana bytes.
 *
 * Leaves(symbols, fastIntLimit, headerCount, unicodePrefix, noneToken, trueToken, falseToken,
 * pair) holds the tokens of one dialect and limits; calling it with (iterable, chunks) gives an
 * iterator over the items of iterable that writes every common leaf (int, str, bytes, float,
 * None, bool and the pair marker, as pbroker._jellier.Jellier._emit would) onto the end of
 * chunks, and yields only the other items, for _emit to handle. Each run of leaves becomes one
 * bytes chunk, appended before the item that ends it is yielded, so the order is kept.
 */

typedef struct {
    PyObject_HEAD
    PyObject *symbols;       /* dict: bytes -> token bytes */
    Py_ssize_t longestSymbol;
    long long fastIntLimit;  /* non-negative ints below this are written here */
    Py_ssize_t headerCount;  /* strings shorter than this are written here */
    PyObject *unicodePrefix; /* bytes */
    PyObject *noneToken;
    PyObject *trueToken;
    PyObject *falseToken;
    PyObject *pair;          /* the marker object that stands for b"\x02\x80" */
} LeavesObject;

typedef struct {
    PyObject_HEAD
    LeavesObject *leaves;
    PyObject *source;
    PyObject *chunks;
} LeafIteratorObject;

typedef struct {
    char *data;
    Py_ssize_t size;
    Py_ssize_t capacity;
    char local[2048];
} Output;

static int
outputReserve(Output *out, Py_ssize_t more)
{
    if (out->size + more <= out->capacity) {
        return 0;
    }
    Py_ssize_t capacity = out->capacity * 2;
    while (capacity < out->size + more) {
        capacity *= 2;
    }
    char *data;
    if (out->data == out->local) {
        data = PyMem_Malloc((size_t)capacity);
        if (data != NULL) {
            memcpy(data, out->local, (size_t)out->size);
        }
    }
    else {
        data = PyMem_Realloc(out->data, (size_t)capacity);
    }
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->data = data;
    out->capacity = capacity;
    return 0;
}

static int
outputWrite(Output *out, const char *data, Py_ssize_t size)
{
    if (outputReserve(out, size) < 0) {
        return -1;
    }
    memcpy(out->data + out->size, data, (size_t)size);
    out->size += size;
    return 0;
}

static int
outputBytes(Output *out, PyObject *bytes)
{
    if (!PyBytes_Check(bytes)) {
        PyErr_SetString(PyExc_TypeError, "Leaves: a token is not bytes");
        return -1;
    }
    return outputWrite(out, PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes));
}

/* A base-128 prefix (least significant group first) and a type byte. */
static int
outputToken(Output *out, unsigned long long value, unsigned char kind)
{
    char token[11];
    int size = 0;
    do {
        token[size++] = (char)(value & 0x7F);
        value >>= 7;
    } while (value);
    token[size++] = (char)kind;
    return outputWrite(out, token, size);
}

/* Append the pending run as one chunk and empty it. */
static int
outputFlush(Output *out, PyObject *chunks)
{
    if (out->size == 0) {
        return 0;
    }
    PyObject *chunk = PyBytes_FromStringAndSize(out->data, out->size);
    if (chunk == NULL) {
        return -1;
    }
    int appended = PyList_Append(chunks, chunk);
    Py_DECREF(chunk);
    out->size = 0;
    return appended;
}

static void
outputRelease(Output *out)
{
    if (out->data != out->local) {
        PyMem_Free(out->data);
    }
}

/* A string's bytes: its symbol's token if it has one, else a STRING header and the bytes. */
static int
outputString(Output *out, LeavesObject *leaves, const char *data, Py_ssize_t size,
             PyObject *bytes)
{
    if (size <= leaves->longestSymbol) {
        PyObject *key = bytes;
        if (key == NULL) {
            key = PyBytes_FromStringAndSize(data, size);
            if (key == NULL) {
                return -1;
            }
        }
        else {
            Py_INCREF(key);
        }
        PyObject *token = PyDict_GetItemWithError(leaves->symbols, key);
        Py_DECREF(key);
        if (token != NULL) {
            return outputBytes(out, token);
        }
        if (PyErr_Occurred()) {
            return -1;
        }
    }
    if (outputToken(out, (unsigned long long)size, 0x82) < 0) {
        return -1;
    }
    return outputWrite(out, data, size);
}

/* Write item if it is a common leaf: 1 if written, 0 if not, -1 on error. */
static int
outputLeaf(Output *out, LeavesObject *leaves, PyObject *item)
{
    PyTypeObject *kind = Py_TYPE(item);
    if (kind == &PyLong_Type) {
        int overflow = 0;
        long long value = PyLong_AsLongLongAndOverflow(item, &overflow);
        if (value == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (overflow || value < 0 || value >= leaves->fastIntLimit) {
            return 0;
        }
        return outputToken(out, (unsigned long long)value, 0x81) < 0 ? -1 : 1;
    }
    if (kind == &PyUnicode_Type) {
        if (PyUnicode_IS_ASCII(item)) {
            Py_ssize_t size = PyUnicode_GET_LENGTH(item);
            if (size >= leaves->headerCount) {
                return 0;
            }
            if (outputBytes(out, leaves->unicodePrefix) < 0) {
                return -1;
            }
            return outputString(out, leaves, (const char *)PyUnicode_DATA(item), size, NULL) < 0
                       ? -1
                       : 1;
        }
        /* Encoded to a new object, not through the UTF-8 cache of the str, which would
         * double the memory of the caller's text. */
        PyObject *encoded = PyUnicode_AsUTF8String(item);
        if (encoded == NULL) {
            return -1;
        }
        Py_ssize_t size = PyBytes_GET_SIZE(encoded);
        int result = 0;
        if (size < leaves->headerCount) {
            result = 1;
            if (outputBytes(out, leaves->unicodePrefix) < 0
                || outputString(out, leaves, PyBytes_AS_STRING(encoded), size, encoded) < 0) {
                result = -1;
            }
        }
        Py_DECREF(encoded);
        return result;
    }
    if (kind == &PyBytes_Type) {
        Py_ssize_t size = PyBytes_GET_SIZE(item);
        if (size >= leaves->headerCount) {
            /* (A long string's symbol token, if it had one, is left to _emit too.) */
            return 0;
        }
        return outputString(out, leaves, PyBytes_AS_STRING(item), size, item) < 0 ? -1 : 1;
    }
    if (item == leaves->pair) {
        return outputWrite(out, "\x02\x80", 2) < 0 ? -1 : 1;
    }
    if (kind == &PyFloat_Type) {
        char token[9];
        token[0] = (char)0x84;
#if PY_VERSION_HEX >= 0x030B0000
        if (PyFloat_Pack8(PyFloat_AS_DOUBLE(item), token + 1, 0) < 0) {
#else
        if (_PyFloat_Pack8(PyFloat_AS_DOUBLE(item), (unsigned char *)token + 1, 0) < 0) {
#endif
            return -1;
        }
        return outputWrite(out, token, 9) < 0 ? -1 : 1;
    }
    if (item == Py_None) {
        return outputBytes(out, leaves->noneToken) < 0 ? -1 : 1;
    }
    if (item == Py_True) {
        return outputBytes(out, leaves->trueToken) < 0 ? -1 : 1;
    }
    if (item == Py_False) {
        return outputBytes(out, leaves->falseToken) < 0 ? -1 : 1;
    }
    return 0;
}

static PyObject *
leafIteratorNext(LeafIteratorObject *self)
{
    PyObject *source = self->source;
    if (source == NULL) {
        return NULL;
    }
    /* The source may run code that calls this iterator again and exhausts it. */
    Py_INCREF(source);
    Output out;
    out.data = out.local;
    out.size = 0;
    out.capacity = (Py_ssize_t)sizeof(out.local);
    PyObject *item;
    while ((item = PyIter_Next(source)) != NULL) {
        int written = outputLeaf(&out, self->leaves, item);
        if (written == 0) {
            if (outputFlush(&out, self->chunks) < 0) {
                Py_CLEAR(item);
            }
            goto done;
        }
        Py_DECREF(item);
        item = NULL;
        if (written < 0) {
            goto done;
        }
        if (out.size >= 65536 && outputFlush(&out, self->chunks) < 0) {
            goto done;
        }
    }
    if (!PyErr_Occurred() && outputFlush(&out, self->chunks) == 0 && self->source == source) {
        Py_CLEAR(self->source);
    }
done:
    outputRelease(&out);
    Py_DECREF(source);
    return item;
}

static int
leafIteratorTraverse(LeafIteratorObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->leaves);
    Py_VISIT(self->source);
    Py_VISIT(self->chunks);
    return 0;
}

static int
leafIteratorClear(LeafIteratorObject *self)
{
    Py_CLEAR(self->leaves);
    Py_CLEAR(self->source);
    Py_CLEAR(self->chunks);
    return 0;
}

static void
leafIteratorDealloc(LeafIteratorObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    leafIteratorClear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyType_Slot leafIteratorSlots[] = {
    {Py_tp_iter, PyObject_SelfIter},
    {Py_tp_iternext, leafIteratorNext},
    {Py_tp_traverse, leafIteratorTraverse},
    {Py_tp_clear, leafIteratorClear},
    {Py_tp_dealloc, leafIteratorDealloc},
    {Py_tp_doc, "The items a Leaves call did not write, in order."},
    {0, NULL},
};

static PyType_Spec leafIteratorSpec = {
    .name = "pbroker._speedups.LeafIterator",
    .basicsize = sizeof(LeafIteratorObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = leafIteratorSlots,
};

static PyObject *
leavesNew(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *symbols, *unicodePrefix, *noneToken, *trueToken, *falseToken, *pair;
    long long fastIntLimit;
    Py_ssize_t headerCount;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "Leaves() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!LnO!O!O!O!O:Leaves", &PyDict_Type, &symbols, &fastIntLimit,
                          &headerCount, &PyBytes_Type, &unicodePrefix, &PyBytes_Type,
                          &noneToken, &PyBytes_Type, &trueToken, &PyBytes_Type, &falseToken,
                          &pair)) {
        return NULL;
    }
    if (fastIntLimit < 0 || fastIntLimit > 0x80000000LL || headerCount < 0
        || headerCount > 0x4000) {
        PyErr_SetString(PyExc_ValueError,
                        "Leaves(): fastIntLimit must be in 0..2**31, headerCount in 0..0x4000");
        return NULL;
    }
    Py_ssize_t longest = -1;
    PyObject *key, *value;
    Py_ssize_t position = 0;
    while (PyDict_Next(symbols, &position, &key, &value)) {
        if (!PyBytes_Check(key) || !PyBytes_Check(value)) {
            PyErr_SetString(PyExc_TypeError, "Leaves(): symbols must map bytes to bytes");
            return NULL;
        }
        if (PyBytes_GET_SIZE(key) > longest) {
            longest = PyBytes_GET_SIZE(key);
        }
    }
    LeavesObject *self = (LeavesObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    /* A copy: the table may not change under the iterators. */
    self->symbols = PyDict_Copy(symbols);
    if (self->symbols == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->longestSymbol = longest;
    self->fastIntLimit = fastIntLimit;
    self->headerCount = headerCount;
    self->unicodePrefix = Py_NewRef(unicodePrefix);
    self->noneToken = Py_NewRef(noneToken);
    self->trueToken = Py_NewRef(trueToken);
    self->falseToken = Py_NewRef(falseToken);
    self->pair = Py_NewRef(pair);
    return (PyObject *)self;
}

static PyObject *
leavesCall(LeavesObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *iterable, *chunks;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "Leaves objects take no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OO!:Leaves", &iterable, &PyList_Type, &chunks)) {
        return NULL;
    }
    PyObject *module = PyType_GetModule(Py_TYPE(self));
    if (module == NULL) {
        return NULL;
    }
    PyTypeObject *iteratorType = *(PyTypeObject **)PyModule_GetState(module);
    PyObject *source = PyObject_GetIter(iterable);
    if (source == NULL) {
        return NULL;
    }
    LeafIteratorObject *iterator = PyObject_GC_New(LeafIteratorObject, iteratorType);
    if (iterator == NULL) {
        Py_DECREF(source);
        return NULL;
    }
    iterator->leaves = (LeavesObject *)Py_NewRef((PyObject *)self);
    iterator->source = source;
    iterator->chunks = Py_NewRef(chunks);
    PyObject_GC_Track(iterator);
    return (PyObject *)iterator;
}

static int
leavesTraverse(LeavesObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->symbols);
    Py_VISIT(self->pair);
    return 0;
}

static int
leavesClear(LeavesObject *self)
{
    Py_CLEAR(self->symbols);
    Py_CLEAR(self->unicodePrefix);
    Py_CLEAR(self->noneToken);
    Py_CLEAR(self->trueToken);
    Py_CLEAR(self->falseToken);
    Py_CLEAR(self->pair);
    return 0;
}

static void
leavesDealloc(LeavesObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    leavesClear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyType_Slot leavesSlots[] = {
    {Py_tp_new, leavesNew},
    {Py_tp_call, leavesCall},
    {Py_tp_dealloc, leavesDealloc},
    {Py_tp_traverse, leavesTraverse},
    {Py_tp_clear, leavesClear},
    {Py_tp_doc,
     "Leaves(symbols, fastIntLimit, headerCount, unicodePrefix, noneToken, trueToken,\n"
     "       falseToken, pair)(iterable, chunks) -> iterator\n\n"
     "Write the common leaves of iterable onto chunks as banana bytes; yield the rest."},
    {0, NULL},
};

static PyType_Spec leavesSpec = {
    .name = "pbroker._speedups.Leaves",
    .basicsize = sizeof(LeavesObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = leavesSlots,
};

static int
speedupsExec(PyObject *module)
{
    PyTypeObject **state = (PyTypeObject **)PyModule_GetState(module);
    PyObject *iteratorType = PyType_FromModuleAndSpec(module, &leafIteratorSpec, NULL);
    if (iteratorType == NULL) {
        return -1;
    }
    *state = (PyTypeObject *)iteratorType;
    PyObject *leavesType = PyType_FromModuleAndSpec(module, &leavesSpec, NULL);
    if (leavesType == NULL) {
        return -1;
    }
    int added = PyModule_AddObjectRef(module, "Leaves", leavesType);
    Py_DECREF(leavesType);
    if (added < 0) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "LeafIterator", iteratorType);
}

static int
speedupsTraverse(PyObject *module, visitproc visit, void *arg)
{
    PyTypeObject **state = (PyTypeObject **)PyModule_GetState(module);
    if (state != NULL) {
        Py_VISIT(*state);
    }
    return 0;
}

static int
speedupsClear(PyObject *module)
{
    PyTypeObject **state = (PyTypeObject **)PyModule_GetState(module);
    if (state != NULL) {
        Py_CLEAR(*state);
    }
    return 0;
}

static void
speedupsFree(void *module)
{
    speedupsClear((PyObject *)module);
}

/*
 * plain(node, allowed, ask): the unjellier's plain expressions in C.
 *
 * node is a jelly list expression. If it and everything in it are plain -- the tags list,
 * tuple, dictionary, unicode and None (each only where allowed: its bit is set in allowed, or,
 * where ask is not None, ask(tag) is true), with any other non-list children taken as they are,
 * str ones only where unicode is allowed -- the value it stands for is returned, built exactly as
 * pbroker._unjellier.Unjellier would build it. ask (the unjellier's _isAllowed) is called at most
 * once a tag, for a tag whose bit is not set, on meeting it, where the Python walk would ask.
 * Anything else (another tag, a malformed expression, a dictionary key other than str, bytes,
 * int or float, text that is not UTF-8, nesting deeper than PLAIN_DEPTH) gives NotImplemented
 * and the Python unjellier takes the node, reporting any error itself.
 */

enum {
    PLAIN_LIST = 1,
    PLAIN_TUPLE = 2,
    PLAIN_DICTIONARY = 4,
    PLAIN_UNICODE = 8,
    PLAIN_NONE = 16,
};

#define PLAIN_DEPTH 64

static int
tagIs(PyObject *tag, const char *name, Py_ssize_t size)
{
    return PyBytes_GET_SIZE(tag) == size && memcmp(PyBytes_AS_STRING(tag), name, (size_t)size) == 0;
}

/* The tags one call may take: those known allowed, those already asked about, and the
 * unjellier's _isAllowed (None at the top of a call, where nothing may be asked). */
typedef struct {
    unsigned allowed;
    unsigned asked;
    PyObject *ask;
    PyObject *failed;
} PlainTags;

/* Whether the plain tag with this bit may be taken: 1, 0, or -1 with an exception. A tag not
 * known yet is asked about here, where the Python walk would ask on opening the node. */
static int
plainAllowed(PyObject *tag, unsigned bit, PlainTags *tags)
{
    if (tags->allowed & bit) {
        return 1;
    }
    if ((tags->asked & bit) || tags->ask == Py_None) {
        return 0;
    }
    tags->asked |= bit;
    Py_INCREF(tag);
    PyObject *answer = PyObject_CallOneArg(tags->ask, tag);
    Py_DECREF(tag);
    if (answer == NULL) {
        return -1;
    }
    int yes = PyObject_IsTrue(answer);
    Py_DECREF(answer);
    if (yes > 0) {
        tags->allowed |= bit;
    }
    return yes;
}


static PyObject *plainNode(PyObject *node, PlainTags *tags, int depth);

/* Python does not randomise the hashes of numbers, and keys chosen to collide take time in
 * proportion to the square of their number to insert. Numbers of which no more than
 * NUMBER_GROUP share a hash (as ordinary data has them: -1 and -2 hash alike) are inserted
 * here at once, each compared with at most that many others; pbroker checks other keys in
 * Python first (see pbroker._native.HashBudget, where NUMBER_GROUP is the same). */
#define NUMBER_GROUP 16

static int
compareHashes(const void *first, const void *second)
{
    Py_hash_t a = *(const Py_hash_t *)first, b = *(const Py_hash_t *)second;
    return (a > b) - (a < b);
}

/* Whether no more than NUMBER_GROUP of the count hashes are alike (sorting them). */
static int
hashesSpread(Py_hash_t *hashes, Py_ssize_t count)
{
    if (count <= NUMBER_GROUP) {
        return 1;
    }
    Py_ssize_t rising = 1; /* (numbered keys often come in order: no sorting then) */
    while (rising < count && hashes[rising - 1] < hashes[rising]) {
        rising++;
    }
    if (rising == count) {
        return 1;
    }
    qsort(hashes, (size_t)count, sizeof(Py_hash_t), compareHashes);
    Py_ssize_t run = 1;
    for (Py_ssize_t i = 1; i < count; i++) {
        run = hashes[i] == hashes[i - 1] ? run + 1 : 1;
        if (run > NUMBER_GROUP) {
            return 0;
        }
    }
    return 1;
}

/* Whether key is a number whose hash runs no Python code (exactly an int or a float). */
static inline int
isNumberKey(PyObject *key)
{
    return PyLong_CheckExact(key) || PyFloat_CheckExact(key);
}

/* What C inserts a key as: 0 text or a byte string (its hash randomised), 1 a number (few
 * of one hash, see hashesSpread), -1 anything else (checked in Python). */
static inline int
plainKeyKind(PyObject *key)
{
    if (PyUnicode_CheckExact(key) || PyBytes_CheckExact(key)) {
        return 0;
    }
    return isNumberKey(key) ? 1 : -1;
}

/* Whether the keys in the list are text, byte strings, or numbers no more than NUMBER_GROUP
 * of which share a hash (then they are inserted without counting). */
static PyObject *
plainKeys(PyObject *module, PyObject *keys)
{
    (void)module;
    if (!PyList_CheckExact(keys)) {
        PyErr_SetString(PyExc_TypeError, "plainKeys() takes a list");
        return NULL;
    }
    Py_ssize_t size = PyList_GET_SIZE(keys);
    Py_hash_t inlineHashes[16];
    Py_hash_t *hashes = inlineHashes;
    if (size > 16) {
        hashes = PyMem_New(Py_hash_t, (size_t)size);
        if (hashes == NULL) {
            return PyErr_NoMemory();
        }
    }
    Py_ssize_t count = 0;
    int plain = 1;
    for (Py_ssize_t i = 0; i < size; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i); /* (no Python code runs: the list stays) */
        int kind = plainKeyKind(key);
        if (kind < 0) {
            plain = 0;
            break;
        }
        if (kind) {
            hashes[count++] = PyObject_Hash(key); /* runs no Python code, cannot fail */
        }
    }
    if (plain) {
        plain = hashesSpread(hashes, count);
    }
    if (hashes != inlineHashes) {
        PyMem_Free(hashes);
    }
    return PyBool_FromLong(plain);
}

/* Whether pair is a (key, value) tuple whose key is text or a byte string (0) or a number
 * (1); -1 if neither. */
static inline int
keyedPair(PyObject *pair)
{
    if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
        return -1;
    }
    return plainKeyKind(PyTuple_GET_ITEM(pair, 0));
}

/* The dict of pairs, a list of (key, value) tuples (a msgpack map, as object_pairs_hook gets
 * it), if its keys are text, byte strings, or numbers no more than NUMBER_GROUP of which
 * share a hash; else
 * fallback(pairs), which checks them (pbroker._native.ValueCodec._checkedMap). */
static PyObject *
keyedMap(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyList_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "keyedMap() takes a fallback and a list of pairs");
        return NULL;
    }
    PyObject *fallback = args[0], *pairs = args[1];
    Py_ssize_t size = PyList_GET_SIZE(pairs);
    /* The numbers' hashes in order, then a copy sorted (to find two alike). */
    Py_hash_t inlineHashes[32];
    Py_hash_t *hashes = inlineHashes, *sorted = inlineHashes + 16;
    if (size > 16) {
        hashes = PyMem_New(Py_hash_t, (size_t)(2 * size));
        if (hashes == NULL) {
            return PyErr_NoMemory();
        }
        sorted = hashes + size;
    }
    Py_ssize_t count = 0;
    int plain = 1;
    for (Py_ssize_t i = 0; i < size && plain; i++) {
        PyObject *pair = PyList_GET_ITEM(pairs, i);
        int number = keyedPair(pair);
        if (number < 0) {
            plain = 0;
        }
        else if (number) {
            /* (Runs no Python code, and cannot fail.) */
            hashes[count] = sorted[count] = PyObject_Hash(PyTuple_GET_ITEM(pair, 0));
            count++;
        }
    }
    PyObject *dictionary = NULL;
    if (plain && hashesSpread(sorted, count)) {
        dictionary = PyDict_New();
        if (dictionary == NULL) {
            plain = -1; /* an error (no memory), not a fallback */
        }
    }
    /* Inserting a key again releases the value it had, whose finaliser may run Python code:
     * each pair is looked at again, and a number must have the hash it had. */
    Py_ssize_t seen = 0;
    for (Py_ssize_t i = 0; dictionary != NULL && i < size; i++) {
        PyObject *pair = PyList_GET_SIZE(pairs) == size ? PyList_GET_ITEM(pairs, i) : NULL;
        int number = pair == NULL ? -1 : keyedPair(pair);
        if (number > 0
            && (seen >= count || PyObject_Hash(PyTuple_GET_ITEM(pair, 0)) != hashes[seen++])) {
            number = -1;
        }
        if (number < 0) {
            Py_CLEAR(dictionary);
            break;
        }
        Py_INCREF(pair);
        int stored = PyDict_SetItem(dictionary, PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1));
        Py_DECREF(pair);
        if (stored < 0) {
            Py_DECREF(dictionary);
            dictionary = NULL;
            plain = -1; /* an error, not a fallback */
        }
    }
    if (hashes != inlineHashes) {
        PyMem_Free(hashes);
    }
    if (dictionary != NULL || plain < 0) {
        return dictionary;
    }
    return PyObject_CallOneArg(fallback, pairs);
}

/* pbroker._native.HashBudget._weighTuple's twin: a walk of a tuple's appearances that weighs
 * its items in C, where the Python walk takes some 50 ns an item. Weights are capped (far
 * above any budget) so that they cannot overflow; the Python twin's are not. */

#define WEIGHT_CAP (PY_SSIZE_T_MAX / 4)

static inline Py_ssize_t
weightSum(Py_ssize_t a, Py_ssize_t b)
{
    Py_ssize_t sum = a + b; /* both at most WEIGHT_CAP: no overflow */
    return sum > WEIGHT_CAP ? WEIGHT_CAP : sum;
}

/* A weight Python gave (an int, perhaps beyond the cap), or -1 with an exception. */
static Py_ssize_t
cappedWeight(PyObject *number)
{
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(number, &overflow);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow > 0 || value > WEIGHT_CAP) {
        return WEIGHT_CAP;
    }
    return value < 0 ? 0 : (Py_ssize_t)value;
}

typedef struct {
    PyObject *tuple; /* a reference held */
    Py_ssize_t index;
    Py_ssize_t weight;
    Py_ssize_t hashed;
    int holds;
} WeighFrame;

/* The remembered weights of item (a tuple): 1, 0 if not remembered, -1 on an error. */
static int
knownWeight(PyObject *weights, PyObject *item, Py_ssize_t *weight, int *holds, Py_ssize_t *hashed)
{
    PyObject *key = PyLong_FromVoidPtr(item);
    if (key == NULL) {
        return -1;
    }
    PyObject *entry = PyDict_GetItemWithError(weights, key); /* borrowed */
    Py_DECREF(key);
    if (entry == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 4) {
        PyErr_SetString(PyExc_TypeError, "weighTuple() found a malformed weight");
        return -1;
    }
    Py_INCREF(entry);
    *weight = cappedWeight(PyTuple_GET_ITEM(entry, 0));
    *hashed = *weight < 0 ? -1 : cappedWeight(PyTuple_GET_ITEM(entry, 3));
    *holds = *hashed < 0 ? -1 : PyObject_IsTrue(PyTuple_GET_ITEM(entry, 1));
    Py_DECREF(entry);
    return *holds < 0 ? -1 : 1;
}

/* The weight of an item that is neither a tuple nor a frozenset (as _atomWeight gives it,
 * which is asked about anything but the plain kinds), or -1 on an error. */
static Py_ssize_t
atomWeight(PyObject *item, PyObject *fallback)
{
    PyTypeObject *kind = Py_TYPE(item);
    if (kind == &PyLong_Type) {
        int overflow;
        (void)PyLong_AsLongLongAndOverflow(item, &overflow);
        if (!overflow) {
            return 1; /* (one that does not fit in 64 bits is asked about) */
        }
    }
    else if (kind == &PyUnicode_Type) {
        return 1 + (PyUnicode_GET_LENGTH(item) >> 6);
    }
    else if (kind == &PyBytes_Type) {
        return 1 + (PyBytes_GET_SIZE(item) >> 6);
    }
    else if (kind == &PyFloat_Type || kind == &PyBool_Type || item == Py_None) {
        return 1;
    }
    PyObject *result = PyObject_CallOneArg(fallback, item);
    if (result == NULL) {
        return -1;
    }
    Py_ssize_t weight = cappedWeight(result);
    Py_DECREF(result);
    return weight;
}

static PyObject *
weighTuple(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4 || !PyTuple_CheckExact(args[0]) || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "weighTuple() takes a tuple, a dict and two functions");
        return NULL;
    }
    PyObject *value = args[0], *weights = args[1], *weighSet = args[2], *fallback = args[3];
    Py_ssize_t weight, hashed;
    int holds;
    int known = knownWeight(weights, value, &weight, &holds, &hashed);
    if (known < 0) {
        return NULL;
    }
    if (known) {
        return Py_BuildValue("(nOn)", weight, holds ? Py_True : Py_False, hashed);
    }
    WeighFrame inlineFrames[16];
    WeighFrame *frames = inlineFrames;
    Py_ssize_t capacity = 16, depth = 0;
    PyObject *result = NULL;
    frames[depth++] = (WeighFrame){Py_NewRef(value), 0, 1, 1, 0};
    while (depth > 0) {
        WeighFrame *frame = &frames[depth - 1];
        if (frame->index < PyTuple_GET_SIZE(frame->tuple)) {
            PyObject *item = PyTuple_GET_ITEM(frame->tuple, frame->index++);
            Py_ssize_t itemHashed;
            int itemHolds = 0;
            if (PyTuple_CheckExact(item)) {
                known = knownWeight(weights, item, &weight, &itemHolds, &itemHashed);
                if (known < 0) {
                    goto done;
                }
                if (!known) {
                    if (depth == capacity) {
                        WeighFrame *grown = PyMem_New(WeighFrame, (size_t)(2 * capacity));
                        if (grown == NULL) {
                            PyErr_NoMemory();
                            goto done;
                        }
                        memcpy(grown, frames, sizeof(WeighFrame) * (size_t)depth);
                        if (frames != inlineFrames) {
                            PyMem_Free(frames);
                        }
                        frames = grown;
                        capacity *= 2;
                    }
                    frames[depth++] = (WeighFrame){Py_NewRef(item), 0, 1, 1, 0};
                    continue;
                }
            }
            else if (PyFrozenSet_CheckExact(item)) {
                Py_INCREF(item);
                PyObject *pair = PyObject_CallOneArg(weighSet, item);
                Py_DECREF(item);
                if (pair == NULL) {
                    goto done;
                }
                if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
                    Py_DECREF(pair);
                    PyErr_SetString(PyExc_TypeError, "weighTuple() got a malformed weight");
                    goto done;
                }
                weight = cappedWeight(PyTuple_GET_ITEM(pair, 0));
                itemHolds = weight < 0 ? -1 : PyObject_IsTrue(PyTuple_GET_ITEM(pair, 1));
                Py_DECREF(pair);
                if (itemHolds < 0) {
                    goto done;
                }
                itemHashed = 1; /* (a frozenset remembers its hash) */
            }
            else {
                Py_INCREF(item);
                weight = atomWeight(item, fallback);
                Py_DECREF(item);
                if (weight < 0) {
                    goto done;
                }
                itemHashed = weight;
            }
            frame = &frames[depth - 1]; /* (unchanged: only a push moves the frames) */
            frame->weight = weightSum(frame->weight, weight);
            frame->hashed = weightSum(frame->hashed, itemHashed);
            frame->holds |= itemHolds;
            continue;
        }
        /* Done with it: remembered, and added to the tuple holding it. */
        WeighFrame done = *frame;
        depth--;
        PyObject *key = PyLong_FromVoidPtr(done.tuple);
        PyObject *entry = key == NULL ? NULL
                                      : Py_BuildValue("(nOOn)", done.weight,
                                                      done.holds ? Py_True : Py_False,
                                                      done.tuple, done.hashed);
        int stored = entry == NULL ? -1 : PyDict_SetItem(weights, key, entry);
        Py_XDECREF(key);
        Py_XDECREF(entry);
        Py_DECREF(done.tuple);
        if (stored < 0) {
            goto done;
        }
        if (depth == 0) {
            result = Py_BuildValue("(nOn)", done.weight, done.holds ? Py_True : Py_False,
                                   done.hashed);
            break;
        }
        WeighFrame *parent = &frames[depth - 1];
        parent->weight = weightSum(parent->weight, done.weight);
        parent->hashed = weightSum(parent->hashed, done.hashed);
        parent->holds |= done.holds;
    }
done:
    for (Py_ssize_t i = 0; i < depth; i++) {
        Py_DECREF(frames[i].tuple);
    }
    if (frames != inlineFrames) {
        PyMem_Free(frames);
    }
    return result;
}

/* plainNode, noting the id of a node that is not plain (and of each node around it) in
 * tags->failed, where it is a set, so that the Python walk does not try it again. */
static PyObject *
plainList(PyObject *node, PlainTags *tags, int depth)
{
    PyObject *value = plainNode(node, tags, depth);
    if (value == Py_NotImplemented && tags->failed != Py_None) {
        PyObject *key = PyLong_FromVoidPtr(node);
        if (key == NULL || PySet_Add(tags->failed, key) < 0) {
            Py_XDECREF(key);
            Py_DECREF(value);
            return NULL;
        }
        Py_DECREF(key);
    }
    return value;
}

/* A child: a list is a node, anything else stands for itself. New reference, NotImplemented
 * (a new reference) if not plain, NULL on error. */
static PyObject *
plainChild(PyObject *child, PlainTags *tags, int depth)
{
    if (PyList_CheckExact(child)) {
        return plainList(child, tags, depth + 1);
    }
    if (PyList_Check(child) || (PyUnicode_Check(child) && !(tags->allowed & PLAIN_UNICODE))) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    return Py_NewRef(child);
}

static PyObject *
plainNode(PyObject *node, PlainTags *tags, int depth)
{
    if (PyList_GET_SIZE(node) == 0 || depth > PLAIN_DEPTH) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    PyObject *tag = PyList_GET_ITEM(node, 0);
    if (!PyBytes_CheckExact(tag)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    unsigned bit = tagIs(tag, "list", 4)         ? PLAIN_LIST
                   : tagIs(tag, "tuple", 5)      ? PLAIN_TUPLE
                   : tagIs(tag, "dictionary", 10) ? PLAIN_DICTIONARY
                   : tagIs(tag, "unicode", 7)    ? PLAIN_UNICODE
                   : tagIs(tag, "None", 4)       ? PLAIN_NONE
                                                 : 0;
    if (bit == 0) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    int allowed = plainAllowed(tag, bit, tags);
    if (allowed <= 0) {
        if (allowed < 0) {
            return NULL;
        }
        Py_RETURN_NOTIMPLEMENTED;
    }
    /* (Read after asking: the security options may have run Python code.) */
    Py_ssize_t size = PyList_GET_SIZE(node);
    if (bit == PLAIN_LIST || bit == PLAIN_TUPLE) {
        PyObject *values = PyList_New(size - 1);
        if (values == NULL) {
            return NULL;
        }
        /* Untracked until full: a finalizer run by a collection below must not reach a list
         * with NULL items through gc.get_objects() or gc.get_referrers(). */
        PyObject_GC_UnTrack(values);
        for (Py_ssize_t i = 1; i < size; i++) {
            /* (An allocation may collect garbage, and a finalizer run Python code: the node is
             * read afresh, and given up if it changed.) */
            if (PyList_GET_SIZE(node) != size) {
                Py_DECREF(values);
                Py_RETURN_NOTIMPLEMENTED;
            }
            PyObject *child = Py_NewRef(PyList_GET_ITEM(node, i));
            PyObject *value = plainChild(child, tags, depth);
            Py_DECREF(child);
            if (value == NULL || value == Py_NotImplemented) {
                Py_DECREF(values);
                return value;
            }
            PyList_SET_ITEM(values, i - 1, value);
        }
        if (bit == PLAIN_LIST) {
            PyObject_GC_Track(values);
            return values;
        }
        PyObject *tuple = PyList_AsTuple(values);
        Py_DECREF(values);
        return tuple;
    }
    if (bit == PLAIN_DICTIONARY) {
        /* Every entry a [key, value] list before any is visited, as _openDictionary checks;
         * and no more than NUMBER_GROUP of its number keys (which stand for themselves) of
         * one hash. */
        Py_hash_t inlineHashes[32];
        Py_hash_t *hashes = inlineHashes;
        if (size > 17) {
            hashes = PyMem_New(Py_hash_t, (size_t)(2 * size));
            if (hashes == NULL) {
                return PyErr_NoMemory();
            }
        }
        Py_hash_t *sorted = hashes + (size > 17 ? size : 16);
        Py_ssize_t count = 0;
        int plainEntries = 1;
        for (Py_ssize_t i = 1; i < size; i++) {
            PyObject *entry = PyList_GET_ITEM(node, i);
            if (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) != 2) {
                plainEntries = 0;
                break;
            }
            PyObject *key = PyList_GET_ITEM(entry, 0);
            if (isNumberKey(key)) {
                hashes[count] = sorted[count] = PyObject_Hash(key); /* runs no Python code */
                count++;
            }
        }
        if (plainEntries) {
            plainEntries = hashesSpread(sorted, count);
        }
        PyObject *dictionary = plainEntries ? PyDict_New() : NULL;
        if (dictionary == NULL) {
            if (hashes != inlineHashes) {
                PyMem_Free(hashes);
            }
            if (plainEntries) {
                return NULL;
            }
            Py_RETURN_NOTIMPLEMENTED;
        }
        /* result: the dictionary, NotImplemented, or NULL (each a new reference). */
        PyObject *result = dictionary;
        Py_ssize_t seen = 0;
        for (Py_ssize_t i = 1; i < size && result == dictionary; i++) {
            if (PyList_GET_SIZE(node) != size) {
                result = Py_NotImplemented;
                break;
            }
            PyObject *entry = PyList_GET_ITEM(node, i);
            if (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) != 2) {
                result = Py_NotImplemented;
                break;
            }
            Py_INCREF(entry);
            PyObject *first = Py_NewRef(PyList_GET_ITEM(entry, 0));
            PyObject *key = plainChild(first, tags, depth);
            Py_DECREF(first);
            if (key == NULL || key == Py_NotImplemented || PyList_GET_SIZE(entry) != 2) {
                Py_DECREF(entry);
                result = key == NULL ? NULL : Py_NotImplemented;
                Py_XDECREF(key);
                break;
            }
            /* Keys whose hash runs no Python code only: the node cannot change under us.
             * Text and byte strings, whose hashes Python randomises, and numbers of the
             * hashes found above, in turn (the unjellier checks other keys, and more numbers
             * of one hash, see HashBudget). */
            int kind = plainKeyKind(key);
            int allowed = kind == 0;
            if (kind > 0 && seen < count) {
                allowed = PyObject_Hash(key) == hashes[seen++];
            }
            if (!allowed) {
                Py_DECREF(entry);
                Py_DECREF(key);
                result = Py_NotImplemented;
                break;
            }
            PyObject *second = Py_NewRef(PyList_GET_ITEM(entry, 1));
            Py_DECREF(entry);
            PyObject *value = plainChild(second, tags, depth);
            Py_DECREF(second);
            if (value == NULL || value == Py_NotImplemented) {
                Py_DECREF(key);
                result = value;
                Py_XDECREF(value);
                break;
            }
            int stored = PyDict_SetItem(dictionary, key, value);
            Py_DECREF(key);
            Py_DECREF(value);
            if (stored < 0) {
                result = NULL;
            }
        }
        if (hashes != inlineHashes) {
            PyMem_Free(hashes);
        }
        if (result != dictionary) {
            Py_DECREF(dictionary);
            return Py_XNewRef(result);
        }
        return dictionary;
    }
    if (bit == PLAIN_UNICODE) {
        PyObject *data = size == 2 ? PyList_GET_ITEM(node, 1) : NULL;
        if (data == NULL || !PyBytes_CheckExact(data)) {
            Py_RETURN_NOTIMPLEMENTED;
        }
        Py_INCREF(data);
        PyObject *text = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), NULL);
        Py_DECREF(data);
        if (text == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            Py_RETURN_NOTIMPLEMENTED;
        }
        return text;
    }
    if (size == 1) {
        Py_RETURN_NONE;
    }
    Py_RETURN_NOTIMPLEMENTED;
}

static PyObject *
plain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "plain() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyList_CheckExact(args[0])) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    unsigned long allowed = PyLong_AsUnsignedLong(args[1]);
    if (allowed == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (args[3] != Py_None && !PySet_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "plain() takes a set or None for failed");
        return NULL;
    }
    PlainTags tags = {(unsigned)allowed, (unsigned)allowed, args[2], args[3]};
    return plainList(args[0], &tags, 0);
}

/*
 * extent(): how many items the native codec would pack for a value's plain containers,
 * walked as it packs them (lists, dicts with their keys, tuples, sets and frozensets, of
 * exactly those types), depth first, without packing anything, and the length of each str
 * and bytes in them. A container that appears more than once is counted each time, as it
 * would be packed: a small value whose lists share their parts may stand for more items (or
 * more copies of a long string) than any message holds. The count of one that appears
 * again is remembered rather than walked again, so the walk takes time in proportion to the
 * distinct containers at most. See pbroker._native.extent, its twin in Python.
 *
 * No code of the value's runs during the walk (no hashing of its objects, no iteration
 * protocol of a class); but before Python 3.12 a garbage collection, and so a finaliser, may
 * run when it allocates, so it holds the containers it is inside (a finaliser that changes
 * the value can make the verdict wrong, not the walk unsafe). The walk keeps its own stack,
 * not the C stack.
 */
enum {
    EXTENT_WITHIN = 0,
    EXTENT_OVER = 1,
    EXTENT_CYCLE = 2,
    EXTENT_KEYS = 3,
};

typedef struct {
    PyObject *container;    /* owned while it is walked (see extentEnter) */
    PyObject *iterator;     /* a set's iterator (owned), else NULL */
    int pendingValue;       /* a dictionary's value is visited after its key's walk */
    Py_ssize_t position;    /* the next index of a list or tuple; PyDict_Next's position */
    Py_ssize_t inside;      /* the items counted inside it so far */
} ExtentFrame;

struct ExtentCount {
    PyObject *container; /* NULL: a free slot */
    Py_ssize_t inside;
};

typedef struct {
    Py_ssize_t left; /* items that may still be counted */
    Py_ssize_t maxDepth;
    int keys; /* whether a dictionary with a key that is not a string was met */
    /* The items inside each shared container walked, by address: an open-addressing table
     * of countsSize slots (a power of 2, or 0), countsUsed of them taken, at most half. It
     * takes 32 bytes a container at most, less than the container itself (56 at least). */
    struct ExtentCount *counts;
    Py_ssize_t countsSize;
    Py_ssize_t countsUsed;
    ExtentFrame *frames; /* the containers being walked, outermost first */
    Py_ssize_t depth;
    Py_ssize_t capacity;
    /* Once the frames outgrow inlineFrames, their containers by address as well: an
     * open-addressing table of 2 * capacity slots (NULL: a free slot), so that a deep walk
     * does not look through every frame for each shared container it meets. They come and
     * go last in, first out, so a frame's slot is simply freed as it is left (the table is
     * then as if that one had never been added). */
    PyObject **path;
    ExtentFrame inlineFrames[32];
} Extent;

static inline int
isPlainContainer(PyObject *object)
{
    PyTypeObject *kind = Py_TYPE(object);
    return kind == &PyList_Type || kind == &PyDict_Type || kind == &PyTuple_Type
           || kind == &PySet_Type || kind == &PyFrozenSet_Type;
}

static inline size_t
extentSlot(PyObject *container, Py_ssize_t size)
{
    uint64_t hash = ((uint64_t)(uintptr_t)container >> 4) * UINT64_C(0x9E3779B97F4A7C15);
    return (size_t)(hash >> 32) & (size_t)(size - 1);
}

/* The slot of container in counts (size slots, a power of 2, fewer than half taken), or the
 * free one where it would go. */
static size_t
extentCountSlot(struct ExtentCount *counts, Py_ssize_t size, PyObject *container)
{
    size_t mask = (size_t)size - 1;
    size_t slot = extentSlot(container, size);
    while (counts[slot].container != NULL && counts[slot].container != container) {
        slot = (slot + 1) & mask;
    }
    return slot;
}

/* The count remembered for container, or -1. */
static Py_ssize_t
extentRemembered(Extent *walk, PyObject *container)
{
    if (walk->countsUsed == 0) {
        return -1;
    }
    struct ExtentCount *entry =
        &walk->counts[extentCountSlot(walk->counts, walk->countsSize, container)];
    return entry->container == container ? entry->inside : -1;
}

/* Remember container's count; -1 if out of memory. */
static int
extentRemember(Extent *walk, PyObject *container, Py_ssize_t inside)
{
    if ((walk->countsUsed + 1) * 2 > walk->countsSize) {
        Py_ssize_t size = walk->countsSize ? walk->countsSize * 2 : 64;
        struct ExtentCount *counts = PyMem_Calloc((size_t)size, sizeof(struct ExtentCount));
        if (counts == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < walk->countsSize; i++) {
            struct ExtentCount *old = &walk->counts[i];
            if (old->container != NULL) {
                counts[extentCountSlot(counts, size, old->container)] = *old;
            }
        }
        PyMem_Free(walk->counts);
        walk->counts = counts;
        walk->countsSize = size;
    }
    struct ExtentCount *entry =
        &walk->counts[extentCountSlot(walk->counts, walk->countsSize, container)];
    if (entry->container == NULL) {
        walk->countsUsed++;
    }
    entry->container = container;
    entry->inside = inside;
    return 0;
}

/* The slot of container in walk->path, or the free one where it would go (there is room). */
static size_t
extentPathSlot(Extent *walk, PyObject *container)
{
    size_t mask = (size_t)(2 * walk->capacity) - 1;
    size_t slot = extentSlot(container, 2 * walk->capacity);
    while (walk->path[slot] != NULL && walk->path[slot] != container) {
        slot = (slot + 1) & mask;
    }
    return slot;
}

/* Room for twice the frames, and walk->path for them; -1 if out of memory. Out of
 * extentEnter (which the compiler then inlines): only deep walks need it. */
#if defined(__GNUC__)
__attribute__((noinline))
#endif
static int
extentGrow(Extent *walk)
{
    Py_ssize_t capacity = walk->capacity * 2;
    ExtentFrame *frames;
    if (walk->frames == walk->inlineFrames) {
        frames = PyMem_New(ExtentFrame, (size_t)capacity);
        if (frames != NULL) {
            memcpy(frames, walk->inlineFrames, sizeof(walk->inlineFrames));
        }
    }
    else {
        frames = PyMem_Resize(walk->frames, ExtentFrame, (size_t)capacity);
    }
    if (frames == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    walk->frames = frames;
    walk->capacity = capacity;
    PyMem_Free(walk->path);
    walk->path = PyMem_Calloc((size_t)(2 * capacity), sizeof(PyObject *));
    if (walk->path == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < walk->depth; i++) {
        PyObject *entered = walk->frames[i].container;
        walk->path[extentPathSlot(walk, entered)] = entered;
    }
    return 0;
}

/* Count container's items and make it the innermost frame, or add what it held when it was
 * walked before, or say why not (or -1 on an error). */
static int
extentEnter(Extent *walk, PyObject *container)
{
    ExtentFrame *parent = walk->depth ? &walk->frames[walk->depth - 1] : NULL;
    /* One held once appears once: it cannot be on the path, or have been walked. */
    if (Py_REFCNT(container) > 1) {
        if (walk->path != NULL) {
            if (walk->path[extentPathSlot(walk, container)] != NULL) {
                return EXTENT_CYCLE;
            }
        }
        else {
            for (Py_ssize_t i = 0; i < walk->depth; i++) {
                if (walk->frames[i].container == container) {
                    return EXTENT_CYCLE;
                }
            }
        }
        Py_ssize_t inside = extentRemembered(walk, container);
        if (inside >= 0) {
            walk->left -= inside;
            parent->inside += inside;
            return walk->left < 0 ? EXTENT_OVER : EXTENT_WITHIN;
        }
    }
    if (walk->depth >= walk->maxDepth) {
        return EXTENT_CYCLE;
    }
    /* Its items count as it is entered: a dictionary's keys and values. */
    PyTypeObject *kind = Py_TYPE(container);
    int isSet = kind == &PySet_Type || kind == &PyFrozenSet_Type;
    Py_ssize_t size;
    if (kind == &PyDict_Type) {
        size = 2 * PyDict_GET_SIZE(container);
    }
    else if (isSet) {
        size = PySet_GET_SIZE(container);
    }
    else {
        size = PySequence_Fast_GET_SIZE(container);
    }
    walk->left -= size;
    if (walk->left < 0) {
        return EXTENT_OVER;
    }
    if (kind == &PyDict_Type && !walk->keys) {
        /* Keys other than strings are not sent as a map: a receiver builds such a dictionary
         * itself, after checking that they do not collide (msgpack would build it
         * unchecked). No code of the value's runs here, so the dictionary cannot change. */
        Py_ssize_t position = 0;
        PyObject *key, *value;
        while (PyDict_Next(container, &position, &key, &value)) {
            if (!PyUnicode_CheckExact(key) && !PyBytes_CheckExact(key)) {
                walk->keys = 1;
                break;
            }
        }
    }
    if (walk->depth == walk->capacity && extentGrow(walk) < 0) {
        return -1;
    }
    /* Held while it is walked: allocating an object the garbage collector tracks (a set
     * iterator) may run a collection, and so a finaliser, before Python 3.12; one that
     * takes a list out of the value must not free it under the walk. */
    Py_INCREF(container);
    PyObject *iterator = NULL;
    if (isSet) {
        iterator = PyObject_GetIter(container);
        if (iterator == NULL) {
            Py_DECREF(container);
            return -1;
        }
    }
    ExtentFrame *frame = &walk->frames[walk->depth++];
    frame->container = container;
    frame->iterator = iterator;
    frame->pendingValue = 0;
    frame->position = 0;
    frame->inside = size;
    if (walk->path != NULL) {
        walk->path[extentPathSlot(walk, container)] = container;
    }
    return EXTENT_WITHIN;
}

/* Done with the innermost frame: its count goes to its parent, and is remembered if its
 * container may appear again. */
static int
extentLeave(Extent *walk)
{
    ExtentFrame *frame = &walk->frames[--walk->depth];
    PyObject *container = frame->container; /* the frame's reference, released below */
    if (walk->path != NULL) {
        walk->path[extentPathSlot(walk, container)] = NULL; /* the last one added */
    }
    Py_CLEAR(frame->iterator);
    int stored = 0;
    /* Held by more than the frame and one other: it may appear again. */
    if (walk->depth > 0) {
        walk->frames[walk->depth - 1].inside += frame->inside;
        if (Py_REFCNT(container) > 2) {
            stored = extentRemember(walk, container, frame->inside);
        }
    }
    Py_DECREF(container);
    return stored;
}

/* Whether item is a plain container to walk (1) or a leaf (0). A string's, a byte string's,
 * a bytearray's or a memoryview's length (in bytes) counts besides, as it is packed each
 * time it appears: -1 if that spends the budget. */
static inline int
extentItem(Extent *walk, ExtentFrame *frame, PyObject *item)
{
    PyTypeObject *kind = Py_TYPE(item);
    Py_ssize_t length;
    if (kind == &PyUnicode_Type) {
        length = PyUnicode_GET_LENGTH(item); /* code points: its UTF-8 bytes at least */
    }
    else if (kind == &PyBytes_Type) {
        length = PyBytes_GET_SIZE(item);
    }
    else if (kind == &PyByteArray_Type) {
        length = PyByteArray_GET_SIZE(item);
    }
    else if (kind == &PyMemoryView_Type) {
        length = PyMemoryView_GET_BUFFER(item)->len;
    }
    else {
        return isPlainContainer(item);
    }
    walk->left -= length; /* left >= 0 before: it cannot overflow */
    if (walk->left < 0) {
        return -1;
    }
    frame->inside += length;
    return 0;
}

/* The next item of the frame's container that is a container itself (borrowed), or NULL
 * when there is none left (or on an error; or with *over set, if the strings met on the
 * way spend the budget). */
static PyObject *
extentNext(Extent *walk, ExtentFrame *frame, int *over)
{
    PyObject *container = frame->container;
    PyTypeObject *kind = Py_TYPE(container);
    PyObject *item = NULL;
    int found = 0;
    if (kind == &PyList_Type || kind == &PyTuple_Type) {
        Py_ssize_t size = PySequence_Fast_GET_SIZE(container);
        PyObject **items = PySequence_Fast_ITEMS(container);
        while (frame->position < size) {
            item = items[frame->position++];
            if ((found = extentItem(walk, frame, item)) != 0) {
                break;
            }
        }
    }
    else if (kind == &PyDict_Type) {
        PyObject *key, *value;
        if (frame->pendingValue) {
            /* Read again, not kept from before the key's walk (during which a finaliser may
             * have changed the dictionary: then this is another entry, or none). */
            frame->pendingValue = 0;
            Py_ssize_t entry = frame->position - 1;
            if (PyDict_Next(container, &entry, &key, &value)) {
                item = value;
                found = extentItem(walk, frame, value);
            }
        }
        if (found == 0) {
            while (PyDict_Next(container, &frame->position, &key, &value)) {
                item = key;
                if ((found = extentItem(walk, frame, key)) != 0) {
                    frame->pendingValue = 1; /* after the key's walk */
                    break;
                }
                item = value;
                if ((found = extentItem(walk, frame, value)) != 0) {
                    break;
                }
            }
        }
    }
    else {
        while ((item = PyIter_Next(frame->iterator)) != NULL) {
            Py_DECREF(item); /* the set holds it still */
            if ((found = extentItem(walk, frame, item)) != 0) {
                break;
            }
        }
    }
    if (found < 0) {
        *over = 1;
    }
    return found > 0 ? item : NULL;
}

static int
extentWalk(Extent *walk, PyObject *value)
{
    int verdict = extentEnter(walk, value);
    int over = 0;
    while (verdict == EXTENT_WITHIN && walk->depth > 0) {
        PyObject *item = extentNext(walk, &walk->frames[walk->depth - 1], &over);
        if (item != NULL) {
            verdict = extentEnter(walk, item);
        }
        else if (over) {
            verdict = EXTENT_OVER;
        }
        else if (PyErr_Occurred() || extentLeave(walk) < 0) {
            return -1;
        }
    }
    return verdict;
}

static PyObject *
extent(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "extent() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    /* Counts stay below twice the budget: it is clamped so that they cannot overflow. */
    Py_ssize_t budget;
    if (toLimit(args[1], PY_SSIZE_T_MAX / 4, &budget) < 0) {
        return NULL;
    }
    Py_ssize_t maxDepth = PyLong_AsSsize_t(args[2]);
    if (maxDepth == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (budget < 0 || maxDepth < 1) {
        PyErr_SetString(PyExc_ValueError, "extent() needs a budget >= 0 and a maxDepth >= 1");
        return NULL;
    }
    if (budget == 0) {
        return PyLong_FromLong(EXTENT_OVER);
    }
    if (!isPlainContainer(args[0])) {
        return PyLong_FromLong(EXTENT_WITHIN);
    }
    Extent walk;
    walk.left = budget - 1; /* the value itself */
    walk.maxDepth = maxDepth;
    walk.keys = 0;
    walk.counts = NULL;
    walk.countsSize = 0;
    walk.countsUsed = 0;
    walk.frames = walk.inlineFrames;
    walk.depth = 0;
    walk.capacity = (Py_ssize_t)(sizeof(walk.inlineFrames) / sizeof(walk.inlineFrames[0]));
    walk.path = NULL;
    int verdict = extentWalk(&walk, args[0]);
    for (Py_ssize_t i = 0; i < walk.depth; i++) {
        Py_XDECREF(walk.frames[i].iterator);
        Py_DECREF(walk.frames[i].container);
    }
    if (walk.frames != walk.inlineFrames) {
        PyMem_Free(walk.frames);
    }
    PyMem_Free(walk.path);
    PyMem_Free(walk.counts);
    if (verdict < 0) {
        return NULL;
    }
    if (verdict == EXTENT_WITHIN && walk.keys) {
        verdict = EXTENT_KEYS;
    }
    return PyLong_FromLong(verdict);
}

/*
 * envelope(): a pbroker2 message envelope of the usual shape, read without copying its large
 * values. See pbroker._native.FrameDecoder.
 */

static uint64_t
readBig(const unsigned char *p, int size)
{
    uint64_t value = 0;
    for (int i = 0; i < size; i++) {
        value = (value << 8) | p[i];
    }
    return value;
}

/* The field at *at (before end), or NULL with no error set if it is of another kind (or cut
 * short, or not UTF-8): the caller then leaves the envelope to msgpack. If asView, a byte
 * string of `large` bytes or more is a slice of *view, made from data on first use. */
static PyObject *
envelopeField(const unsigned char **at, const unsigned char *end, PyObject *data,
              const unsigned char *base, Py_ssize_t large, int asView, PyObject **view)
{
    const unsigned char *p = *at;
    unsigned char tag = *p++;
    uint64_t size;
    int width;
    if (tag <= 0x7f) {
        *at = p;
        return PyLong_FromLong(tag);
    }
    if (tag >= 0xe0) {
        *at = p;
        return PyLong_FromLong((long)(signed char)tag);
    }
    if (tag >= 0xa0 && tag <= 0xbf) {
        size = tag & 0x1f;
        goto text;
    }
    switch (tag) {
    case 0x80: /* an empty map (a call's keyword arguments, none) */
        *at = p;
        return PyDict_New();
    case 0xc0:
        *at = p;
        Py_RETURN_NONE;
    case 0xc2:
        *at = p;
        Py_RETURN_FALSE;
    case 0xc3:
        *at = p;
        Py_RETURN_TRUE;
    case 0xcc: case 0xcd: case 0xce: case 0xcf:
        width = 1 << (tag - 0xcc);
        if (end - p < width) {
            return NULL;
        }
        *at = p + width;
        return PyLong_FromUnsignedLongLong((unsigned long long)readBig(p, width));
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        width = 1 << (tag - 0xd0);
        if (end - p < width) {
            return NULL;
        }
        uint64_t raw = readBig(p, width);
        int64_t value;
        if (width < 8 && (raw >> (8 * width - 1))) {
            value = (int64_t)(raw | (~(uint64_t)0 << (8 * width))); /* sign-extended */
        }
        else {
            memcpy(&value, &raw, sizeof(value));
        }
        *at = p + width;
        return PyLong_FromLongLong((long long)value);
    }
    case 0xd9: case 0xda: case 0xdb:
        width = 1 << (tag - 0xd9);
        if (end - p < width) {
            return NULL;
        }
        size = readBig(p, width);
        p += width;
        goto text;
    case 0xc4: case 0xc5: case 0xc6:
        width = 1 << (tag - 0xc4);
        if (end - p < width) {
            return NULL;
        }
        size = readBig(p, width);
        p += width;
        if (size > (uint64_t)(end - p)) {
            return NULL;
        }
        *at = p + size;
        if ((Py_ssize_t)size < large || !asView) {
            return PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)size);
        }
        if (*view == NULL) {
            *view = PyMemoryView_FromObject(data);
            if (*view == NULL) {
                return NULL;
            }
        }
        return PySequence_GetSlice(*view, p - base, p - base + (Py_ssize_t)size);
    default:
        return NULL;
    }
text:
    if (size > (uint64_t)(end - p)) {
        return NULL;
    }
    {
        PyObject *text = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)size, "strict");
        if (text == NULL) {
            if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                PyErr_Clear(); /* msgpack reports it, in its words */
            }
            return NULL;
        }
        *at = p + size;
        return text;
    }
}

static PyObject *
envelope(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "envelope() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *valueFields = args[4];
    if (!PyDict_CheckExact(valueFields)) {
        PyErr_SetString(PyExc_TypeError, "envelope() needs a dict of value fields");
        return NULL;
    }
    PyObject *data = args[0];
    if (!PyBytes_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "envelope() reads bytes only");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t stop = PyLong_AsSsize_t(args[2]);
    if (stop == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t large = PyLong_AsSsize_t(args[3]);
    if (large == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (start < 0 || stop < start || stop > PyBytes_GET_SIZE(data) || large < 1) {
        PyErr_SetString(PyExc_ValueError, "envelope() needs 0 <= start <= stop <= len(data)");
        return NULL;
    }
    const unsigned char *base = (const unsigned char *)PyBytes_AS_STRING(data);
    const unsigned char *p = base + start;
    const unsigned char *end = base + stop;
    Py_ssize_t count;
    if (p == end) {
        Py_RETURN_NONE;
    }
    unsigned char tag = *p++;
    if ((tag & 0xf0) == 0x90) {
        count = tag & 0x0f;
    }
    else if (tag == 0xdc && end - p >= 2) {
        count = (Py_ssize_t)readBig(p, 2);
        p += 2;
    }
    else {
        Py_RETURN_NONE; /* array32 and other values: not an envelope this reads */
    }
    if (count > end - p) {
        Py_RETURN_NONE; /* each field takes a byte at least: msgpack says what is wrong */
    }
    PyObject *fields = PyList_New(count);
    if (fields == NULL) {
        return NULL;
    }
    PyObject *view = NULL;
    unsigned long long views = 0; /* bit i: field i is a value (see VALUE_FIELDS) */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *field =
            p < end ? envelopeField(&p, end, data, base, large, i < 64 && ((views >> i) & 1), &view)
                    : NULL;
        if (field != NULL && i == 0 && PyBytes_CheckExact(field)) {
            PyObject *mask = PyDict_GetItemWithError(valueFields, field); /* borrowed */
            if (mask != NULL) {
                views = PyLong_AsUnsignedLongLongMask(mask);
            }
            if (PyErr_Occurred()) {
                Py_DECREF(field);
                field = NULL;
            }
        }
        if (field == NULL) {
            Py_DECREF(fields);
            Py_XDECREF(view);
            if (PyErr_Occurred()) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        PyList_SET_ITEM(fields, i, field);
    }
    Py_XDECREF(view);
    if (p != end) {
        Py_DECREF(fields);
        Py_RETURN_NONE; /* bytes after the envelope */
    }
    return fields;
}

/*
 * record(): the WHOLE record of a message of the usual shape, packed in one piece. See
 * pbroker._native.wholeRecord.
 */

#define RECORD_PARTS 4

typedef struct {
    Py_buffer parts[RECORD_PARTS];
    Py_ssize_t count;
} RecordValue;

static void
writeBig(unsigned char *p, uint64_t value, int size)
{
    for (int i = size - 1; i >= 0; i--) {
        p[i] = (unsigned char)(value & 0xff);
        value >>= 8;
    }
}

/* The msgpack header of a str (tag 0xd9) or bin (0xc4) of size bytes, as msgpack writes it
 * (a fixstr below 32 bytes); its length. */
static int
sizedHeader(unsigned char *out, int text, Py_ssize_t size)
{
    if (text && size < 32) {
        out[0] = (unsigned char)(0xa0 | size);
        return 1;
    }
    unsigned char first = text ? 0xd9 : 0xc4;
    if (size < 0x100) {
        out[0] = first;
        out[1] = (unsigned char)size;
        return 2;
    }
    if (size < 0x10000) {
        out[0] = first + 1;
        writeBig(out + 1, (uint64_t)size, 2);
        return 3;
    }
    out[0] = first + 2;
    writeBig(out + 1, (uint64_t)size, 4);
    return 5;
}

/* An int as msgpack packs it, into out (9 bytes at most); its length, or 0 if it does not
 * fit 64 bits (msgpack then says so). */
static int
packedInt(unsigned char *out, PyObject *number)
{
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(number, &overflow);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow < 0) {
        return 0;
    }
    if (overflow > 0) {
        unsigned long long big = PyLong_AsUnsignedLongLong(number);
        if (big == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        out[0] = 0xcf;
        writeBig(out + 1, (uint64_t)big, 8);
        return 9;
    }
    if (value >= 0) {
        if (value < 0x80) {
            out[0] = (unsigned char)value;
            return 1;
        }
        if (value < 0x100) {
            out[0] = 0xcc;
            out[1] = (unsigned char)value;
            return 2;
        }
        if (value < 0x10000) {
            out[0] = 0xcd;
            writeBig(out + 1, (uint64_t)value, 2);
            return 3;
        }
        if (value < 0x100000000LL) {
            out[0] = 0xce;
            writeBig(out + 1, (uint64_t)value, 4);
            return 5;
        }
        out[0] = 0xcf;
        writeBig(out + 1, (uint64_t)value, 8);
        return 9;
    }
    if (value >= -32) {
        out[0] = (unsigned char)(signed char)value;
        return 1;
    }
    if (value >= -0x80) {
        out[0] = 0xd0;
        out[1] = (unsigned char)(signed char)value;
        return 2;
    }
    if (value >= -0x8000) {
        out[0] = 0xd1;
        writeBig(out + 1, (uint64_t)value, 2);
        return 3;
    }
    if (value >= -0x80000000LL) {
        out[0] = 0xd2;
        writeBig(out + 1, (uint64_t)value, 4);
        return 5;
    }
    out[0] = 0xd3;
    writeBig(out + 1, (uint64_t)value, 8);
    return 9;
}

/* Writes field to out (NULL: only sizes it) and returns its packed size; 0 if it is of
 * another kind (the caller leaves the message to msgpack), -1 on an error. A field of
 * packedType has its parts' buffers taken into value, the first time (out == NULL). */
static Py_ssize_t
recordField(unsigned char *out, PyObject *field, PyObject *packedType, Py_ssize_t inlineLimit,
            RecordValue *value)
{
    unsigned char head[9];
    PyTypeObject *type = Py_TYPE(field);
    if (type == &PyBytes_Type) {
        Py_ssize_t size = PyBytes_GET_SIZE(field);
        int length = sizedHeader(head, 0, size);
        if (out != NULL) {
            memcpy(out, head, (size_t)length);
            memcpy(out + length, PyBytes_AS_STRING(field), (size_t)size);
        }
        return length + size;
    }
    if (type == &PyLong_Type) {
        int length = packedInt(head, field);
        if (length > 0 && out != NULL) {
            memcpy(out, head, (size_t)length);
        }
        return length;
    }
    if (field == Py_None || field == Py_False || field == Py_True) {
        if (out != NULL) {
            out[0] = field == Py_None ? 0xc0 : field == Py_True ? 0xc3 : 0xc2;
        }
        return 1;
    }
    if (type == &PyUnicode_Type) {
        Py_ssize_t size;
        const char *text = PyUnicode_AsUTF8AndSize(field, &size);
        if (text == NULL) {
            if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
                PyErr_Clear(); /* msgpack reports it, in its words */
                return 0;
            }
            return -1;
        }
        int length = sizedHeader(head, 1, size);
        if (out != NULL) {
            memcpy(out, head, (size_t)length);
            memcpy(out + length, text, (size_t)size);
        }
        return length + size;
    }
    if ((PyObject *)type != packedType) {
        return 0;
    }
    if (out == NULL) {
        if (value->count >= 0) {
            return 0; /* a second value: the Python way */
        }
        PyObject *parts = PyObject_GetAttrString(field, "parts");
        if (parts == NULL) {
            return -1;
        }
        if (!PyTuple_CheckExact(parts) || PyTuple_GET_SIZE(parts) > RECORD_PARTS) {
            Py_DECREF(parts);
            return 0;
        }
        value->count = 0;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(parts); i++) {
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(parts, i), &value->parts[i], PyBUF_SIMPLE)
                < 0) {
                Py_DECREF(parts);
                return -1;
            }
            value->count++;
        }
        Py_DECREF(parts);
    }
    Py_ssize_t size = 0;
    for (Py_ssize_t i = 0; i < value->count; i++) {
        size += value->parts[i].len;
    }
    if (size > inlineLimit) {
        return 0; /* it goes after the envelope, in fragments */
    }
    int length = sizedHeader(head, 0, size);
    if (out != NULL) {
        memcpy(out, head, (size_t)length);
        out += length;
        for (Py_ssize_t i = 0; i < value->count; i++) {
            memcpy(out, value->parts[i].buf, (size_t)value->parts[i].len);
            out += value->parts[i].len;
        }
    }
    return length + size;
}

static PyObject *
record(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "record() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *message = args[0];
    PyObject *packedType = args[1];
    Py_ssize_t inlineLimit = PyLong_AsSsize_t(args[2]);
    if (inlineLimit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[3]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyList_CheckExact(message)) {
        Py_RETURN_NONE; /* a tuple (Twisted's sendCall), a list subclass: the Python way */
    }
    Py_ssize_t count = PyList_GET_SIZE(message);
    if (count > 15) {
        Py_RETURN_NONE;
    }
    /* The fields, held: taking a part's buffer can run Python code (__buffer__, from Python
     * 3.12), which may change the list; the record is sized and written from these. */
    PyObject *fields[15];
    for (Py_ssize_t i = 0; i < count; i++) {
        fields[i] = Py_NewRef(PyList_GET_ITEM(message, i));
    }
    RecordValue value;
    value.count = -1;
    PyObject *result = NULL;
    Py_ssize_t size = 1; /* the fixarray header */
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t field = recordField(NULL, fields[i], packedType, inlineLimit, &value);
        if (field < 0) {
            goto done;
        }
        if (field == 0) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        size += field;
    }
    if (size > limit || size > 0x3fffffff) {
        result = Py_NewRef(Py_None); /* fragments */
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, 4 + size);
    if (result == NULL) {
        goto done;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    writeBig(out, (uint64_t)size, 4);
    out[4] = (unsigned char)(0x90 | count);
    out += 5;
    for (Py_ssize_t i = 0; i < count; i++) {
        /* (Held, immutable or with their buffers taken: as they were sized.) */
        out += recordField(out, fields[i], packedType, inlineLimit, &value);
    }
done:
    for (Py_ssize_t i = 0; i < value.count; i++) {
        PyBuffer_Release(&value.parts[i]);
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_DECREF(fields[i]);
    }
    return result;
}

/* Let the kernel have back the whole pages of a writable buffer whose bytes were just copied
 * and will never be read again (a piece of a large message the decoder made, see joinParts):
 * freed later, a piece in the allocator's heap would otherwise keep its pages resident while
 * the value joined from the pieces takes as much again. Only pages entirely inside the buffer
 * are given back: the allocator's own bytes around it are not touched, and a page given back
 * reads as zeros if it is ever touched again. */
static void
discardPages(Py_buffer *view)
{
#if defined(__linux__) && defined(MADV_DONTNEED)
    long page = sysconf(_SC_PAGESIZE);
    if (view->readonly || page <= 0) {
        return;
    }
    uintptr_t start = (uintptr_t)view->buf;
    uintptr_t end = start + (uintptr_t)view->len;
    uintptr_t first = (start + (uintptr_t)page - 1) & ~((uintptr_t)page - 1);
    uintptr_t last = end & ~((uintptr_t)page - 1);
    if (last > first) {
        (void)madvise((void *)first, last - first, MADV_DONTNEED);
    }
#else
    (void)view;
#endif
}

/* Whether the n bytes at p are all ASCII (below 0x80). */
static int
allAscii(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t word;
        memcpy(&word, p + i, 8);
        if (word & UINT64_C(0x8080808080808080)) {
            return 0;
        }
    }
    for (; i < n; i++) {
        if (p[i] & 0x80) {
            return 0;
        }
    }
    return 1;
}

/* The bytes in a list of buffers, or -1 with an exception set; or -2 (no exception) if
   asciiOnly and a byte is not ASCII. */
static Py_ssize_t
partsSize(PyObject *parts, const char *name, int asciiOnly)
{
    if (!PyList_CheckExact(parts)) {
        PyErr_Format(PyExc_TypeError, "%s() needs a list, not %.80s", name, Py_TYPE(parts)->tp_name);
        return -1;
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(parts); i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PyList_GET_ITEM(parts, i), &view, PyBUF_SIMPLE) < 0) {
            return -1;
        }
        Py_ssize_t length = view.len;
        int ascii = !asciiOnly || allAscii((const unsigned char *)view.buf, view.len);
        PyBuffer_Release(&view);
        if (!ascii) {
            return -2;
        }
        if (length > PY_SSIZE_T_MAX - total) {
            PyErr_Format(PyExc_OverflowError, "%s(): the parts are too large", name);
            return -1;
        }
        total += length;
    }
    return total;
}

/* Copy the parts into out (total bytes), letting go of each once copied (its list item set
   to None) and giving back the whole pages of a writable one; 0, or -1 with an exception
   set if they changed meanwhile (or, if asciiOnly, stopped being ASCII). */
static int
copyParts(PyObject *parts, char *out, Py_ssize_t total, const char *name, int asciiOnly)
{
    Py_ssize_t offset = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(parts); i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PyList_GET_ITEM(parts, i), &view, PyBUF_SIMPLE) < 0) {
            return -1;
        }
        if (view.len > total - offset
            || (asciiOnly && !allAscii((const unsigned char *)view.buf, view.len))) {
            PyBuffer_Release(&view);
            break;
        }
        memcpy(out + offset, view.buf, (size_t)view.len);
        offset += view.len;
        discardPages(&view);
        PyBuffer_Release(&view);
        /* Let go of the part at once: the last view of a piece frees it. */
        Py_INCREF(Py_None);
        if (PyList_SetItem(parts, i, Py_None) < 0) {
            return -1;
        }
    }
    if (offset != total) {
        PyErr_Format(PyExc_RuntimeError, "%s(): the parts changed while joined", name);
        return -1;
    }
    return 0;
}

static PyObject *
joinParts(PyObject *module, PyObject *parts)
{
    (void)module;
    Py_ssize_t total = partsSize(parts, "joinParts", 0);
    if (total < 0) {
        return NULL;
    }
    PyObject *joined = PyBytes_FromStringAndSize(NULL, total);
    if (joined == NULL) {
        return NULL;
    }
    if (copyParts(parts, PyBytes_AS_STRING(joined), total, "joinParts", 0) < 0) {
        Py_DECREF(joined);
        return NULL;
    }
    return joined;
}

static PyObject *
joinText(PyObject *module, PyObject *parts)
{
    (void)module;
    Py_ssize_t total = partsSize(parts, "joinText", 1);
    if (total == -2) {
        Py_RETURN_NONE;  /* (the parts untouched: joined and decoded by the caller) */
    }
    if (total < 0) {
        return NULL;
    }
    PyObject *text = PyUnicode_New(total, 127);
    if (text == NULL) {
        return NULL;
    }
    if (copyParts(parts, (char *)PyUnicode_DATA(text), total, "joinText", 1) < 0) {
        Py_DECREF(text);
        return NULL;
    }
    return text;
}

static PyMethodDef methods[] = {
    {"extent", (PyCFunction)(void (*)(void))extent, METH_FASTCALL,
     "extent(value, budget, maxDepth)\n--\n\n"
     "0: the native codec would pack value's plain containers in budget items or fewer;\n"
     "1: more; 2: a container inside itself, or containers nested deeper than maxDepth;\n"
     "3: within budget, but a dictionary has a key that is not a string or byte string.\n"
     "See pbroker._native.extent."},
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(buffer, position, expressionStart, vocabulary, sizeLimit, prefixLimit, depthLimit,\n"
     "     messageSizeLimit, text, current, remaining, parents, wanted, results)\n"
     "--\n\n"
     "Decode banana tokens into the open lists and results; see pbroker.banana._scanPython."},
    {"keyedMap", (PyCFunction)(void (*)(void))keyedMap, METH_FASTCALL,
     "keyedMap(fallback, pairs)\n--\n\n"
     "The dict of a list of (key, value) pairs whose keys are text, byte strings, or numbers\n"
     "no more than 16 of which share a hash; else fallback(pairs). See\n"
     "pbroker._native.ValueCodec._document."},
    {"weighTuple", (PyCFunction)(void (*)(void))weighTuple, METH_FASTCALL,
     "weighTuple(value, weights, weighSet, atomWeight)\n--\n\n"
     "pbroker._native.HashBudget._weighTuple in C: (weight, holds, hashed), capped."},
    {"plainKeys", (PyCFunction)plainKeys, METH_O,
     "plainKeys(keys)\n--\n\n"
     "Whether the keys in a list are text, byte strings, or numbers no more than 16 of\n"
     "which share a hash; see pbroker._native.HashBudget.spendKeys."},
    {"envelope", (PyCFunction)(void (*)(void))envelope, METH_FASTCALL,
     "envelope(data, start, stop, large, valueFields)\n--\n\n"
     "The list msgpack reads from data[start:stop] if it is an array of integers, text, byte\n"
     "strings, None, booleans and empty maps; else None. A byte string of large bytes or\n"
     "more is a memoryview of data if it is a value: its field's bit is set in\n"
     "valueFields[first field]. See pbroker._native.FrameDecoder."},
    {"record", (PyCFunction)(void (*)(void))record, METH_FASTCALL,
     "record(message, packedType, inlineLimit, limit)\n--\n\n"
     "The WHOLE record (header and msgpack array) of a list of fewer than 16 byte strings,\n"
     "text, integers, None and booleans, with at most one packedType value of no more than\n"
     "inlineLimit bytes carried as bin; None if the message is of another kind or its\n"
     "envelope over limit bytes. See pbroker._native.wholeRecord."},
    {"joinParts", (PyCFunction)joinParts, METH_O,
     "joinParts(parts)\n--\n\n"
     "The bytes of a list of buffers joined, which are its parts of a large message nothing\n"
     "reads again: each is let go of (its list item set to None) once copied, and the whole\n"
     "pages of a writable one given back to the system (Linux). See pbroker._native._value."},
    {"joinText", (PyCFunction)joinText, METH_O,
     "joinText(parts)\n--\n\n"
     "The text of a list of buffers of ASCII, joined as joinParts joins bytes (each part let\n"
     "go of once copied, the whole pages of a writable one given back), or None, the parts\n"
     "untouched, if a byte is not ASCII. See pbroker._native._spliced."},
    {"plain", (PyCFunction)(void (*)(void))plain, METH_FASTCALL,
     "plain(node, allowed, ask)\n--\n\n"
     "The value of a plain jelly expression, or NotImplemented; see pbroker._unjellier."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef_Slot slots[] = {
    {Py_mod_exec, speedupsExec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef speedupsModule = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pbroker._speedups",
    .m_doc = "The banana codec's hot loops in C (optional; pbroker has the same in Python).",
    .m_size = sizeof(PyTypeObject *),
    .m_methods = methods,
    .m_slots = slots,
    .m_traverse = speedupsTraverse,
    .m_clear = speedupsClear,
    .m_free = speedupsFree,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedupsModule);
}
