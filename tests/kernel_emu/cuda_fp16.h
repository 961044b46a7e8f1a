// The kernels include this; cuda_shim.h already defines what they use from it.
#pragma once
