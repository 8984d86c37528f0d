//! A usb-device class that makes a microcontroller an Entropy Key (to be written).
