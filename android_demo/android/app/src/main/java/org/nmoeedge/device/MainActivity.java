package org.nmoeedge.device;

import com.getcapacitor.BridgeActivity;

public class MainActivity extends BridgeActivity {}
