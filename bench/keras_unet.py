# The chapter's U-Net in Keras, as the chapter writes it (unchanged), for bench/peers.py's
# side-by-side. Used by bench/keras_worker.py, in a TensorFlow virtual environment of its own.
import time, sys, numpy as np
import tensorflow as tf
from tensorflow.keras.layers import Input, Conv2D, MaxPooling2D, Conv2DTranspose, Concatenate, Dropout
from tensorflow.keras.models import Model
def unet_model(output_channels):
    inputs = Input(shape=[128, 128, 3]); x=inputs; skips=[]
    for f in (64,128,256):
        x = Conv2D(f, 3, activation='relu', padding='same')(x); x = Conv2D(f, 3, activation='relu', padding='same')(x); skips.append(x); x = MaxPooling2D()(x)
    x = Conv2D(512, 3, activation='relu', padding='same')(x); x = Conv2D(512, 3, activation='relu', padding='same')(x); x = Dropout(0.5)(x)
    for f,s in zip((256,128,64), reversed(skips)):
        x = Conv2DTranspose(f, 3, strides=2, padding='same')(x); x = Concatenate()([x, s])
        x = Conv2D(f, 3, activation='relu', padding='same')(x); x = Conv2D(f, 3, activation='relu', padding='same')(x)
    outputs = Conv2D(output_channels, 1, activation='softmax')(x)
    return Model(inputs=inputs, outputs=outputs)
if __name__ == "__main__":
    B=int(sys.argv[1]) if len(sys.argv)>1 else 8
    m=unet_model(3); m.compile(optimizer='adam', loss='sparse_categorical_crossentropy', jit_compile=(len(sys.argv)>2))
    print('params', m.count_params())
    x=np.ones((B,128,128,3),np.float32); y=np.zeros((B,128,128,1),np.int32)
    t=time.time(); m.train_on_batch(x,y); print('first', time.time()-t)
    n=5; t=time.time()
    for _ in range(n): m.train_on_batch(x,y)
    dt=(time.time()-t)/n; print(f'keras B={B} step {dt:.3f}s {B/dt:.2f} img/s')
