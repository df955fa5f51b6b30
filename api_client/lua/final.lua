-- Included where a script decides on a record `rec` it decoded: is it final?
local s = rec['status']
local final = s == 'succeeded' or s == 'failed' or s == 'canceled'
