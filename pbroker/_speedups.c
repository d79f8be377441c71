/*
 * pbroker._speedups: the banana decoder's token loop in C.
 *
 * scan() is a drop-in for pbroker.banana._scanPython: same arguments, same result, same
 * errors, for any split of the input. banana.py keeps everything around the loop (buffer
 * keeping, limits, messages); this file only turns bytes into tokens and tokens into lists.
 * The differential tests in tests/test_banana.py and tests/test_fuzz.py hold the two to each
 * other.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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
toLimit(PyObject *number, Py_ssize_t *out)
{
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(number, &overflow);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow > 0 || value > LIMIT_CEILING) {
        value = LIMIT_CEILING;
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
    if (toLimit(args[4], &sizeLimit) < 0 || toLimit(args[5], &prefixLimit) < 0
        || toLimit(args[6], &depthLimit) < 0) {
        return NULL;
    }
    if (args[7] != Py_None && toLimit(args[7], &messageSizeLimit) < 0) {
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
    Py_ssize_t wanted = PyLong_AsSsize_t(args[12]);
    if (wanted == -1 && PyErr_Occurred()) {
        return NULL;
    }

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
                    shift += 7;
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
                goto stop;
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
                                goto stop;
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
                        goto stop; /* too little has come to tell */
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
                goto stop;
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

stop:
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

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(buffer, position, expressionStart, vocabulary, sizeLimit, prefixLimit, depthLimit,\n"
     "     messageSizeLimit, text, current, remaining, parents, wanted, results)\n"
     "--\n\n"
     "Decode banana tokens into the open lists and results; see pbroker.banana._scanPython."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef_Slot slots[] = {
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef speedupsModule = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pbroker._speedups",
    .m_doc = "The banana decoder's token loop in C (optional; banana.py has the same in Python).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedupsModule);
}
