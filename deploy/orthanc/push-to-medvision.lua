-- Every study that stays unchanged for Orthanc's StableAge is sent to medvision by DICOMweb STOW-RS;
-- medvision stores each study's report (a DICOM SR) back into this Orthanc.
function OnStableStudy(studyId, tags, metadata)
  RestApiPost('/dicom-web/servers/medvision/stow', '{"Resources": ["' .. studyId .. '"], "Synchronous": false}')
end
