// What the stand-in C API recorded (see c_api_stub.cpp).
#pragma once
#include "decode.h"
#include "nms.h"

extern rf_decode_params g_last_decode;
extern rf_nms_params g_last_nms;
extern int g_decode_calls;
extern int g_nms_calls;
